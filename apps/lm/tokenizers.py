"""Tokenizers built locally: character-level and byte-level BPE (trained with the ``tokenizers`` library).

Nothing is fetched from a hub. Both tokenizers serialise to a JSON string (``to_json`` /
:func:`tokenizer_from_json`) so the exact tokenizer travels inside checkpoints and cache metadata and is
reloaded for generation. A BPE tokenizer is also written as a *standard* ``tokenizer.json``
(:func:`save_tokenizer`, the ``tokenizers.Tokenizer.to_str()`` document) that
``tokenizers.Tokenizer.from_file`` and transformers' ``PreTrainedTokenizerFast(tokenizer_file=...)`` load;
:func:`tokenizer_from_json` reads both forms.

:func:`token_byte_table` gives, per token id, its UTF-8 byte length and the whitespace facts needed to count
words, so that bits per byte and word-level perplexity are computed from token ids alone.
"""

from __future__ import annotations

import json
import os
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
        tok.train_from_iterator(
            [text], vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False, special_tokens=[]
        )
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

    def to_standard_json(self) -> str:
        """The plain ``tokenizers`` document (what ``Tokenizer.from_file`` and ``PreTrainedTokenizerFast``
        read)."""
        return self._tok.to_str()

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for (byte-level alphabet mapped back to bytes)."""
        return bytes(_BYTE_DECODER[c] for c in self._tok.id_to_token(int(i)))


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
    """Inverse of ``to_json`` for both tokenizers; a standard ``tokenizers`` document (``"model"`` key) is
    read as a byte-level BPE tokenizer."""
    d = json.loads(s)
    if "model" in d and "kind" not in d:
        return BPETokenizer(tokenizer_json=s)
    if d.get("kind") == "char":
        return CharTokenizer(chars=d["chars"])
    if d.get("kind") == "bpe":
        return BPETokenizer(tokenizer_json=d["tokenizer"])
    raise ValueError(f"unknown tokenizer kind in JSON: {d.get('kind')!r}")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tok`` to ``path``: a BPE tokenizer as a standard ``tokenizer.json``, a char tokenizer as its
    own JSON (no standard form); atomic (temporary file in the same folder, then ``os.replace``)."""
    p = Path(path)
    text = tok.to_standard_json() if isinstance(tok, BPETokenizer) else tok.to_json()
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p


def load_tokenizer(path: str | Path) -> CharTokenizer | BPETokenizer:
    return tokenizer_from_json(Path(path).read_text(encoding="utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE (bytes 33..126, 161..172, 174..255 map
    to themselves, the rest to 256 + n)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


def token_byte_table(tok: Tokenizer) -> list[tuple[int, int, int, int]]:
    """Per token id: ``(n_bytes, word_starts_inside, first_byte_is_non_space, last_byte_is_space)``.

    A word starts at a non-whitespace byte that is the first byte of the text or follows a whitespace byte
    (``str.split()`` words). ``word_starts_inside`` counts starts at byte positions > 0 of the token; a start
    at position 0 depends on the previous token (its last byte). Summing ``n_bytes`` over scored targets gives
    the bytes for bits per byte; the word columns give the words for word-level perplexity.
    """
    rows = []
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i) if isinstance(tok, BPETokenizer) else tok.decode([i]).encode("utf-8")
        ws = [c in _WHITESPACE for c in b]
        inside = sum(1 for j in range(1, len(b)) if not ws[j] and ws[j - 1])
        rows.append((len(b), inside, int(bool(b) and not ws[0]), int(bool(b) and ws[-1])))
    return rows
