"""Tokenizers built locally: character-level and byte-level BPE (trained with the ``tokenizers`` library).

Nothing is fetched from a hub. Both tokenizers serialise to a JSON string (``to_json`` /
:func:`tokenizer_from_json`) so the exact tokenizer travels inside checkpoints and cache metadata and is
reloaded for generation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol


class Tokenizer(Protocol):
    """What the LM app needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_json(self) -> str: ...


class CharTokenizer:
    """Character-level tokenizer: vocabulary = sorted set of characters (stable ids, nanoGPT convention).

    Args:
        chars: the vocabulary, one character per id, without duplicates.
    """

    kind = "char"

    def __init__(self, *, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer: chars (the vocabulary) is empty")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars must be distinct single characters")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        """Vocabulary ``sorted(set(text))``."""
        if not text:
            raise ValueError("CharTokenizer.fit: the text is empty")
        return cls(chars=sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars})


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained locally with HF ``tokenizers``.

    Byte-level means every UTF-8 string round-trips exactly, whatever the training text.

    Args:
        tokenizer_json: the serialised ``tokenizers.Tokenizer`` (``Tokenizer.to_str()``).
    """

    kind = "bpe"

    def __init__(self, *, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(tokenizer_json)

    @classmethod
    def fit(cls, text: str, *, vocab_size: int = 512, min_frequency: int = 2) -> BPETokenizer:
        """Train on ``text`` (offline, seconds for tiny shakespeare)."""
        from tokenizers import ByteLevelBPETokenizer

        if not text:
            raise ValueError("BPETokenizer.fit: the text is empty")
        if vocab_size < 257:
            raise ValueError(
                f"vocab_size must be >= 257 for byte-level BPE (256 bytes + merges), got {vocab_size}"
            )
        tok = ByteLevelBPETokenizer(add_prefix_space=False)
        tok.train_from_iterator([text], vocab_size=vocab_size, min_frequency=min_frequency,
                                show_progress=False, special_tokens=[])
        return cls(tokenizer_json=tok._tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": "bpe", "tokenizer": self._tok.to_str()})


def fit_tokenizer(
    kind: Literal["char", "bpe"], text: str, *, vocab_size: int = 512
) -> CharTokenizer | BPETokenizer:
    """Build a tokenizer of the given kind on ``text`` (the one place ``kind`` is resolved)."""
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "bpe":
        return BPETokenizer.fit(text, vocab_size=vocab_size)
    raise ValueError(f"tokenizer must be 'char' or 'bpe', got {kind!r}")


def tokenizer_from_json(s: str) -> CharTokenizer | BPETokenizer:
    """Inverse of ``to_json`` for both tokenizers."""
    d = json.loads(s)
    if d.get("kind") == "char":
        return CharTokenizer(chars=d["chars"])
    if d.get("kind") == "bpe":
        return BPETokenizer(tokenizer_json=d["tokenizer"])
    raise ValueError(f"unknown tokenizer kind in JSON: {d.get('kind')!r}")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(tok.to_json(), encoding="utf-8")
    return p


def load_tokenizer(path: str | Path) -> CharTokenizer | BPETokenizer:
    return tokenizer_from_json(Path(path).read_text(encoding="utf-8"))
