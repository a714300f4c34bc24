"""Language-model data: tokenised corpora as memory-mapped shards, seeded random training windows, fixed val
split.

Corpus: tiny shakespeare by default (``tinyshakespeare/input.txt`` in the data directory, sha256-checked), or
any UTF-8 text file / folder of ``.txt`` files given by ``text_path``. Split [D, nanoGPT convention]: first
``1 - val_fraction`` of the characters train, the rest validation, by position. The char vocabulary is built
on the whole text (``sorted(set(text))``, as nanoGPT's shakespeare_char); BPE is fitted on the train
part only.

Cache: ``apps.datadir.cache_dir("lm", <key>)`` holds ``train.bin`` / ``val.bin`` (uint16 when the vocabulary
fits, else uint32), ``tokenizer.json`` and ``meta.json``; the key hashes the text, tokenizer settings and
split.

Exact resume [D]: training batch ``g`` of epoch ``e`` is a pure function of ``(seed, rank, e, g)`` (window
starts drawn by ``numpy.random.default_rng``), and the train loader is *stateful* in Lightning's sense
(``state_dict``/``load_state_dict``): it records how many batches of the current epoch the trainer has
processed, so a run resumed from a mid-epoch checkpoint sees exactly the batches an uninterrupted run would
have seen.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from apps.datadir import cache_dir, data_dir, require_file
from apps.lm.tokenizers import fit_tokenizer, save_tokenizer, token_byte_table, tokenizer_from_json

log = logging.getLogger(__name__)
progress = logging.getLogger("moekit.progress")  # stage lines of long steps; the moekit CLI shows them

TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def check_text(text: str, where: str | Path) -> str:
    """Refuse text that cannot be a corpus: empty, or holding NUL characters (a binary file read as text)."""
    if not text.strip():
        raise ValueError(f"text corpus {where} is empty")
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise ValueError(
            f"text corpus {where} holds NUL bytes (first at character {nul}, line {line}): a binary file is "
            "not a text corpus"
        )
    return text


def _read_utf8(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {f} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def read_corpus(path: str | Path) -> str:
    """Read a UTF-8 text file, or every ``*.txt`` file of a folder (sorted by name, joined by a newline).

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no ``.txt`` file.
        ValueError: a file is not valid UTF-8, holds NUL bytes, or the corpus is empty.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"text folder {p} holds no .txt files")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(
            f"text corpus {p} not found (expected a UTF-8 .txt file or a folder of .txt files)"
        )
    parts = [check_text(_read_utf8(f), f) if f.stat().st_size else "" for f in files]
    return check_text("\n".join(parts), p)


# WikiExtractor output (datasets/wikipedia_en/SOURCE.txt): parse headers with this regex, not an XML parser
_DOC_RE = re.compile(r'^<doc id="\d+" url="[^"]*" title=".*">$')
WIKIPEDIA_SPLIT: dict[str, tuple[int, ...]] = {
    "train": tuple(range(1, 96)), "test": (96, 97), "val": (98, 99),
}  # fmt: skip
"""File numbers ``AA/wiki_NN`` per split: SOURCE.txt's suggested valid split (wiki_98..99), and a test split
taken out of its train files (wiki_96..97, as it suggests)."""


def read_wikiextractor(files: list[Path]) -> str:
    """Article text of WikiExtractor files: ``<doc ...>`` / ``</doc>`` lines and empty lines dropped, the
    repeated title line kept as the article's first line, HTML entities of titles unescaped; articles joined
    by a newline.

    Raises:
        ValueError: a file is not UTF-8, holds NUL bytes, or its ``<doc`` and ``</doc>`` lines do not balance.
    """
    out: list[str] = []
    for f in files:
        text = check_text(_read_utf8(f), f)
        depth = 0
        for n, line in enumerate(text.split("\n"), 1):
            if line.startswith("<doc ") and _DOC_RE.match(line):
                if depth:
                    raise ValueError(f"{f} line {n}: <doc> opened inside another article")
                depth, title_next = 1, True
                continue
            if line == "</doc>":
                if not depth:
                    raise ValueError(f"{f} line {n}: </doc> without an open <doc>")
                depth = 0
                continue
            if not line.strip():
                continue
            out.append(html.unescape(line) if depth and title_next else line)
            title_next = False
        if depth:
            raise ValueError(f"{f}: the last <doc> is never closed")
    return "\n".join(out) + "\n"


def wikipedia_splits(root: Path, *, max_train_files: int | None = None) -> dict[str, str]:
    """The train / val / test texts of ``wikipedia_en`` (:data:`WIKIPEDIA_SPLIT`); ``max_train_files`` keeps
    the first n train files (a subset for quick runs and tests)."""
    folder = root / "wikipedia_en" / "AA"
    out = {}
    for split, numbers in WIKIPEDIA_SPLIT.items():
        if split == "train" and max_train_files is not None:
            if max_train_files < 1:
                raise ValueError(f"max_train_files must be >= 1, got {max_train_files}")
            numbers = numbers[:max_train_files]
        files = [folder / f"wiki_{i:02d}" for i in numbers]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"wikipedia_en: file {f} not found (set MOEKIT_DATA or data_dir to the folder holding "
                    "wikipedia_en/AA/wiki_01 .. wiki_99)"
                )
        out[split] = read_wikiextractor(files)
    return out


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """First ``1 - val_fraction`` of the characters train, the rest val (by position)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = int((1.0 - val_fraction) * len(text))
    return text[:n], text[n:]


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


# split points for batched encoding: before a line that starts with a non-space character. Byte-level BPE's
# pre-tokeniser (GPT-2 regex) always separates a newline from a following non-space character, so encoding
# the pieces one by one gives exactly the ids of the whole text (tested).
_CHUNK_RE = re.compile(r"(?<=\n)(?=\S)")


def encode_text(tok: Any, text: str, *, what: str, chunk_chars: int = 1 << 22) -> np.ndarray:
    """Token ids of ``text`` (int64), encoded in chunks with progress lines for long texts."""
    if tok.kind != "bpe" or len(text) <= chunk_chars:
        return np.asarray(tok.encode(text), dtype=np.int64)
    pieces = _CHUNK_RE.split(text)
    out, batch, size, done, start = [], [], 0, 0, time.perf_counter()
    for i, piece in enumerate(pieces):
        batch.append(piece)
        size += len(piece)
        if size >= chunk_chars or i == len(pieces) - 1:
            out += [np.asarray(e.ids, dtype=np.int64) for e in tok._tok.encode_batch(batch)]
            done += size
            progress.info(
                "lm: encoding %s: %.0f%% (%.1f s)", what, 100 * done / len(text), time.perf_counter() - start
            )
            batch, size = [], 0
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def prepare_corpus(
    *,
    text_path: Path | None = None,
    sha256: str | None = None,
    tokenizer: Literal["char", "bpe"],
    bpe_vocab_size: int,
    val_fraction: float = 0.1,
    cache: Path | None = None,
    test_path: Path | None = None,
    splits: dict[str, str] | None = None,
    name: str | None = None,
    tokenizer_file: Path | None = None,
) -> Path:
    """Tokenise a corpus once into memory-mappable shards; return the cache folder.

    ``tokenizer_file`` (a standard ``tokenizer.json``, e.g. of a model brought in by ``moekit lm import``) is
    used as is instead of training a vocabulary.

    Either ``text_path`` (split by position with ``val_fraction``) or ``splits`` (texts keyed ``train``,
    ``val`` and optionally ``test``, e.g. :func:`wikipedia_splits`); ``test_path`` adds a held-out test text
    read apart from the training text. The folder holds ``<split>.bin``, ``tokenizer.json`` (a BPE tokenizer
    in the standard ``tokenizers`` format) and ``meta.json`` (dtype, token / character / byte / word counts
    per split, vocab size, source, sha256). An existing complete folder is reused.
    """
    if splits is None:
        if text_path is None:
            raise ValueError("prepare_corpus needs text_path or splits")
        text = read_corpus(text_path)
        digest = sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
        train_text, val_text = split_text(text, val_fraction)
        splits = {"train": train_text, "val": val_text}
        name = name or Path(text_path).stem
    else:
        text = None
        for k, v in splits.items():
            check_text(v, f"{name or 'corpus'} {k} split")
        digest = hashlib.sha256("\x00".join(splits[k] for k in sorted(splits)).encode("utf-8")).hexdigest()
    if test_path is not None:
        splits = {**splits, "test": read_corpus(test_path)}
        digest = hashlib.sha256(
            (digest + hashlib.sha256(splits["test"].encode()).hexdigest()).encode()
        ).hexdigest()
    key = hashlib.sha256(
        json.dumps([digest, tokenizer, bpe_vocab_size if tokenizer == "bpe" else 0, val_fraction,
                    hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest() if tokenizer_file else None]
                   ).encode()
    ).hexdigest()[:16]
    out = Path(cache) if cache is not None else cache_dir("lm", f"{name or 'corpus'}-{tokenizer}-{key}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").is_file():
        return out
    start = time.perf_counter()
    total = sum(len(v) for v in splits.values())
    what = text_path or name
    progress.info("lm: tokenising %s (%d chars) with %s into %s ...", what, total, tokenizer, out)
    # char vocabulary over the whole text (stable ids, nanoGPT); BPE fitted on the train split only
    fit_on = "".join(splits.values()) if tokenizer == "char" else splits["train"]
    if tokenizer_file is not None:
        tok = tokenizer_from_json(Path(tokenizer_file).read_text(encoding="utf-8"))
    else:
        if len(fit_on) > 1 << 22:  # a minute or more on a large corpus: say so first
            progress.info("lm: training the %s vocabulary on %d chars ...", tokenizer, len(fit_on))
        tok = fit_tokenizer(tokenizer, fit_on, vocab_size=bpe_vocab_size)
    dtype = _dtype_for(tok.vocab_size)
    counts = {}
    for split, part in splits.items():
        ids = encode_text(tok, part, what=f"{split} split").astype(dtype)
        tmp = out / f".{split}.bin.tmp"
        ids.tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        counts[split] = int(ids.size)
        progress.info("lm: %s split: %d tokens (%.1f s)", split, counts[split], time.perf_counter() - start)
    save_tokenizer(tok, out / "tokenizer.json")
    meta = {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokens": counts,
        "source": str(text_path) if text_path is not None else name,
        "sha256": digest,
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
        "chars": {k: len(v) for k, v in splits.items()},
        "bytes": {k: len(v.encode("utf-8")) for k, v in splits.items()},
        "words": {k: len(v.split()) for k, v in splits.items()},
    }
    # meta.json last (atomically): its presence marks a complete cache entry
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, out / "meta.json")
    log.info("tokenised %s with %s: %s tokens -> %s", name, tokenizer, counts, out)
    return out


def load_tokens(folder: Path, split: Literal["train", "val", "test"]) -> np.memmap:
    meta = json.loads((folder / "meta.json").read_text())
    return np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


class RandomWindows(IterableDataset):
    """Seeded random ``(x, y)`` windows of a token array, served as whole batches.

    Batch ``g`` of epoch ``e`` on rank ``r``: starts ``~ U{0..n-T-1}`` drawn by ``default_rng([seed, r, e,
    g])``; ``x = tokens[s:s+T]``, ``y = tokens[s+1:s+T+1]``, both ``(B, T)`` int64. With DataLoader workers,
    worker ``w`` produces batches ``g ≡ w (mod workers)``, so the interleaved order is the same for any worker
    count.
    """

    def __init__(
        self, *, tokens: np.ndarray, context_len: int, batch_size: int, batches_per_epoch: int, seed: int
    ) -> None:
        super().__init__()
        if len(tokens) <= context_len + 1:
            raise ValueError(
                f"corpus has {len(tokens)} tokens, need more than context_len + 1 = {context_len + 1}"
            )
        self.tokens, self.context_len, self.batch_size = tokens, context_len, batch_size
        self.batches_per_epoch, self.seed = batches_per_epoch, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch(self, epoch: int, g: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, rank, epoch, g])
        starts = rng.integers(0, len(self.tokens) - self.context_len - 1, size=self.batch_size)
        idx = starts[:, None] + np.arange(self.context_len + 1)[None, :]  # (B, T+1)
        win = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))  # (B, T+1)
        return win[:, :-1], win[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for g in range(self.start, self.batches_per_epoch):
            if (g - self.start) % nw == wid:
                yield self.batch(self.epoch, g, rank)


IGNORE_INDEX = -100
"""Target id of positions a sliding evaluation window does not score (``F.cross_entropy``'s ignore index)."""


class FixedWindows(Dataset):
    """Evaluation windows from the start of a token array (deterministic).

    Without ``stride`` (or ``stride == context_len``): non-overlapping ``T+1`` chunks. With ``stride < T``
    (sliding evaluation with carried context, as published perplexities are computed): window ``i`` starts
    at ``i * stride``; window 0 scores all its T targets, every later window only its last ``stride`` targets
    (the others get :data:`IGNORE_INDEX`), so each token is scored once with at least ``T - stride`` tokens of
    context. Only full windows are used (the last ``< stride`` tokens of the split are not scored).
    """

    def __init__(
        self, *, tokens: np.ndarray, context_len: int, max_windows: int | None, stride: int | None = None
    ) -> None:
        stride = context_len if stride is None else stride
        if not 1 <= stride <= context_len:
            raise ValueError(f"eval stride must be in 1..context_len={context_len}, got {stride}")
        if len(tokens) < context_len + 1:
            raise ValueError(
                f"evaluation split has {len(tokens)} tokens, need at least context_len + 1 = "
                f"{context_len + 1}"
            )
        n = (len(tokens) - 1 - context_len) // stride + 1
        self.tokens, self.context_len, self.stride = tokens, context_len, stride
        self.n = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.stride
        win = torch.from_numpy(
            np.asarray(self.tokens[s : s + self.context_len + 1], dtype=np.int64)
        )  # (T+1,)
        x, y = win[:-1], win[1:].clone()
        if i > 0 and self.stride < self.context_len:
            y[: self.context_len - self.stride] = IGNORE_INDEX  # scored by an earlier window
        return x, y


class ResumableLoader(DataLoader):
    """DataLoader over :class:`RandomWindows` whose state is the trainer's position in the epoch.

    ``progress`` returns ``(epoch, batches processed in that epoch)`` from the trainer; Lightning stores
    :meth:`state_dict` in checkpoints and calls :meth:`load_state_dict` before iterating on resume.
    """

    def __init__(
        self, dataset: RandomWindows, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.progress = progress
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.progress() if self.progress is not None else (self.dataset.epoch, 0)
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches_done"]))

    def __iter__(self):
        epoch = self.progress()[0] if self.progress is not None else self.dataset.epoch
        self.dataset.epoch = epoch
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1] % self.dataset.batches_per_epoch
        self._resume = None
        self.dataset.start = start
        return super().__iter__()


class LMDataModule(L.LightningDataModule):
    """Tokenised text for next-token prediction.

    Args:
        data_dir: folder holding the data sets; default ``apps.datadir.data_dir()``.
        corpus: ``tinyshakespeare`` (split by position with ``val_fraction``) or ``wikipedia_en`` (split by
            file, :data:`WIKIPEDIA_SPLIT`: train wiki_01..95, test wiki_96..97, val wiki_98..99).
        text_path: another corpus (a UTF-8 file or a folder of ``.txt`` files) instead of ``corpus``.
        test_path: a held-out test text (file or folder of ``.txt``), read apart from the training text; the
            test split of ``moekit lm test``. Without it (and outside wikipedia_en) test scores the val split.
        tokenizer: ``char`` or byte-level ``bpe``.
        bpe_vocab_size: BPE vocabulary size (256 bytes + merges), trained on the train split.
        max_train_files: wikipedia_en only: keep the first n train files (quick runs and tests).
        context_len: T, tokens per training window.
        batch_size: B.
        batches_per_epoch: training batches per (virtual) epoch; windows are random, so an epoch is a logging
            unit.
        val_fraction: tail fraction of the text used for validation (``text_path`` / tiny shakespeare).
        val_batch_size: batch size for validation and test.
        max_val_windows: cap on evaluation windows (None: the whole split).
        eval_stride: sliding evaluation: a new window every ``eval_stride`` tokens, each token scored once
            with at least ``T - eval_stride`` tokens of context (None: non-overlapping windows).
        word_ppl: also report word-level perplexity ``exp(total nll / whitespace words)`` (meaningful for a
            word-tokenised corpus such as WikiText, to compare with published tables).
        tokenizer_file: a ``tokenizer.json`` to use instead of training one (continued pretraining of an
            imported model: its own tokenizer); ``tokenizer`` and ``bpe_vocab_size`` are then ignored.
        predict_path: unlabelled text (file or folder of ``.txt``) that ``moekit lm predict`` scores window by
            window, encoded with the run's tokenizer (not cached, not part of any split); None: predict scores
            the test split (or val).
        seed: seed of the training window sampler.
        num_workers: DataLoader workers.
        cache_path: explicit cache folder (default under ``apps.datadir.cache_dir("lm")``).
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        corpus: Literal["tinyshakespeare", "wikipedia_en"] = "tinyshakespeare",
        text_path: str | None = None,
        test_path: str | None = None,
        tokenizer: Literal["char", "bpe"] = "char",
        bpe_vocab_size: int = 512,
        max_train_files: int | None = None,
        context_len: int = 64,
        batch_size: int = 12,
        batches_per_epoch: int = 500,
        val_fraction: float = 0.1,
        val_batch_size: int = 64,
        max_val_windows: int | None = None,
        eval_stride: int | None = None,
        word_ppl: bool = False,
        tokenizer_file: str | None = None,
        predict_path: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_path: str | None = None,
    ) -> None:
        super().__init__()
        if tokenizer not in ("char", "bpe"):
            raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
        if corpus not in ("tinyshakespeare", "wikipedia_en"):
            raise ValueError(f"corpus must be 'tinyshakespeare' or 'wikipedia_en', got {corpus!r}")
        for name, v in (
            ("context_len", context_len),
            ("batch_size", batch_size),
            ("batches_per_epoch", batches_per_epoch),
            ("val_batch_size", val_batch_size),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if eval_stride is not None and not 1 <= eval_stride <= context_len:
            raise ValueError(f"eval_stride must be in 1..context_len={context_len}, got {eval_stride}")
        self.save_hyperparameters()
        self.data_dir, self.corpus, self.text_path, self.test_path = data_dir, corpus, text_path, test_path
        self.tokenizer_kind, self.max_train_files = tokenizer, max_train_files
        self.bpe_vocab_size, self.context_len, self.batch_size = bpe_vocab_size, context_len, batch_size
        self.batches_per_epoch, self.val_fraction, self.val_batch_size = (
            batches_per_epoch,
            val_fraction,
            val_batch_size,
        )
        self.max_val_windows, self.eval_stride, self.word_ppl = max_val_windows, eval_stride, word_ppl
        self.seed, self.num_workers, self.predict_path = seed, num_workers, predict_path
        self.tokenizer_file = tokenizer_file
        self.cache_path = cache_path
        self.folder: Path | None = None
        self.tokenizer = None
        self.token_table: torch.Tensor | None = None
        self.meta: dict[str, Any] = {}

    def prepare_data(self) -> None:
        self._prepare()

    def _prepare(self) -> Path:
        cache = Path(self.cache_path) if self.cache_path else None
        test = Path(self.test_path) if self.test_path else None
        common = {
            "tokenizer": self.tokenizer_kind,
            "bpe_vocab_size": self.bpe_vocab_size,
            "cache": cache,
            "test_path": test,
            "tokenizer_file": Path(self.tokenizer_file) if self.tokenizer_file else None,
        }
        if self.text_path is None and self.corpus == "wikipedia_en":
            n = self.max_train_files
            splits = wikipedia_splits(data_dir(self.data_dir), max_train_files=n)
            return prepare_corpus(
                splits=splits, name=f"wikipedia_en{'' if n is None else f'-{n}f'}", **common
            )
        if self.text_path is not None:
            path, sha = Path(self.text_path), None
        else:
            path = require_file(
                data_dir(self.data_dir) / "tinyshakespeare" / "input.txt",
                sha256=TINYSHAKESPEARE_SHA256,
                url=TINYSHAKESPEARE_URL,
                what="tiny shakespeare",
            )
            sha = TINYSHAKESPEARE_SHA256
        return prepare_corpus(text_path=path, sha256=sha, val_fraction=self.val_fraction, **common)

    def setup(self, stage: str | None = None) -> None:
        if self.folder is None:
            self.folder = self._prepare()
            self.meta = json.loads((self.folder / "meta.json").read_text())
            self.tokenizer = tokenizer_from_json((self.folder / "tokenizer.json").read_text(encoding="utf-8"))
            self.token_table = torch.tensor(token_byte_table(self.tokenizer), dtype=torch.long)  # (V, 4)

    @property
    def vocab_size(self) -> int:
        self.setup()
        return self.tokenizer.vocab_size

    @property
    def has_test_split(self) -> bool:
        self.setup()
        return "test" in self.meta.get("tokens", {})

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        ds = RandomWindows(
            tokens=load_tokens(self.folder, "train"),
            context_len=self.context_len,
            batch_size=self.batch_size,
            batches_per_epoch=self.batches_per_epoch,
            seed=self.seed,
        )
        # a private generator: creating the iterator must not consume the global RNG (exact resume)
        return ResumableLoader(
            ds,
            progress=self._progress,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _eval_loader(self, split: str, tokens: np.ndarray | None = None, capped: bool = True) -> DataLoader:
        self.setup()
        ds = FixedWindows(
            tokens=load_tokens(self.folder, split) if tokens is None else tokens,
            context_len=self.context_len,
            max_windows=self.max_val_windows if capped else None,
            stride=self.eval_stride,
        )
        return DataLoader(
            ds,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """The held-out test split (``test_path``, or wikipedia_en's test files); else the val split, with a
        warning (tiny shakespeare has no test split, datasets/tinyshakespeare.md)."""
        if self.has_test_split:
            return self._eval_loader("test")
        log.warning("lm: no test split (set data.test_path): test scores the validation split")
        return self._eval_loader("val")

    def predict_dataloader(self) -> DataLoader:
        """``moekit lm predict`` scores the held-out windows (per-window NLL / perplexity) of the test split
        when there is one, else of val, or the unlabelled ``predict_path`` text; to continue a prompt use
        ``moekit lm generate``."""
        if self.predict_path is not None:
            self.setup()
            text = read_corpus(self.predict_path)
            ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
            progress.info("lm: predict: %s, %d tokens", self.predict_path, len(ids))
            return self._eval_loader("predict", tokens=ids, capped=False)  # every window of the user's text
        return self._eval_loader("test" if self.has_test_split else "val")
