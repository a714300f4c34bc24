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
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from apps.datadir import cache_dir, data_dir, require_file
from apps.lm.tokenizers import fit_tokenizer, tokenizer_from_json

log = logging.getLogger(__name__)
progress = logging.getLogger("moekit.progress")  # stage lines of long steps; the moekit CLI shows them

TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def read_corpus(path: str | Path) -> str:
    """Read a UTF-8 text file, or every ``*.txt`` file of a folder (sorted by name, joined by a newline).

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no ``.txt`` file.
        ValueError: a file is not valid UTF-8, or the corpus is empty.
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
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {f} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    text = "\n".join(parts)
    if not text.strip():
        raise ValueError(f"text corpus {p} is empty")
    return text


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """First ``1 - val_fraction`` of the characters train, the rest val (by position)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = int((1.0 - val_fraction) * len(text))
    return text[:n], text[n:]


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def prepare_corpus(
    *, text_path: Path, sha256: str | None, tokenizer: Literal["char", "bpe"], bpe_vocab_size: int,
    val_fraction: float, cache: Path | None = None,
) -> Path:
    """Tokenise a corpus once into memory-mappable shards; return the cache folder.

    The folder holds ``train.bin``, ``val.bin``, ``tokenizer.json`` and ``meta.json`` (dtype, token counts,
    vocab size, source, sha256). An existing complete folder is reused.
    """
    text = read_corpus(text_path)
    digest = sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = hashlib.sha256(
        json.dumps([digest, tokenizer, bpe_vocab_size if tokenizer == "bpe" else 0, val_fraction]).encode()
    ).hexdigest()[:16]
    out = Path(cache) if cache is not None else cache_dir("lm", f"{text_path.stem}-{tokenizer}-{key}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").is_file():
        return out
    train_text, val_text = split_text(text, val_fraction)
    start = time.perf_counter()
    progress.info("lm: tokenising %s (%d chars) with %s into %s ...", text_path, len(text), tokenizer, out)
    # char vocabulary over the whole file (stable ids); BPE fitted on the train part only
    # (datasets/tinyshakespeare.md)
    tok = fit_tokenizer(tokenizer, text if tokenizer == "char" else train_text, vocab_size=bpe_vocab_size)
    dtype = _dtype_for(tok.vocab_size)
    counts = {}
    for name, part in (("train", train_text), ("val", val_text)):
        ids = np.asarray(tok.encode(part), dtype=dtype)
        ids.tofile(out / f"{name}.bin")
        counts[name] = int(ids.size)
        progress.info("lm: %s split: %d tokens (%.1f s)", name, counts[name], time.perf_counter() - start)
    (out / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
    meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "tokens": counts, "source": str(text_path),
            "sha256": digest, "tokenizer": tokenizer, "val_fraction": val_fraction,
            "chars": {"train": len(train_text), "val": len(val_text)}}
    # meta.json last: its presence marks a complete cache entry
    (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    log.info("tokenised %s with %s: %s tokens -> %s", text_path, tokenizer, counts, out)
    return out


def load_tokens(folder: Path, split: Literal["train", "val"]) -> np.memmap:
    meta = json.loads((folder / "meta.json").read_text())
    return np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


class RandomWindows(IterableDataset):
    """Seeded random ``(x, y)`` windows of a token array, served as whole batches.

    Batch ``g`` of epoch ``e`` on rank ``r``: starts ``~ U{0..n-T-1}`` drawn by ``default_rng([seed, r, e,
    g])``; ``x = tokens[s:s+T]``, ``y = tokens[s+1:s+T+1]``, both ``(B, T)`` int64. With DataLoader workers,
    worker ``w`` produces batches ``g ≡ w (mod workers)``, so the interleaved order is the same for any worker
    count.
    """

    def __init__(self, *, tokens: np.ndarray, context_len: int, batch_size: int, batches_per_epoch: int,
                 seed: int) -> None:
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


class FixedWindows(Dataset):
    """Validation windows: non-overlapping ``T+1`` chunks from the start of the val tokens (deterministic)."""

    def __init__(self, *, tokens: np.ndarray, context_len: int, max_windows: int | None) -> None:
        n = (len(tokens) - 1) // context_len
        if n < 1:
            raise ValueError(
                f"val split has {len(tokens)} tokens, need more than context_len + 1 = {context_len + 1}"
            )
        self.tokens, self.context_len = tokens, context_len
        self.n = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.context_len
        win = torch.from_numpy(
            np.asarray(self.tokens[s : s + self.context_len + 1], dtype=np.int64)
        )  # (T+1,)
        return win[:-1], win[1:]


class ResumableLoader(DataLoader):
    """DataLoader over :class:`RandomWindows` whose state is the trainer's position in the epoch.

    ``progress`` returns ``(epoch, batches processed in that epoch)`` from the trainer; Lightning stores
    :meth:`state_dict` in checkpoints and calls :meth:`load_state_dict` before iterating on resume.
    """

    def __init__(self, dataset: RandomWindows, progress: Callable[[], tuple[int, int]] | None = None,
                 **kwargs: Any) -> None:
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
        data_dir: folder holding ``tinyshakespeare/``; default ``apps.datadir.data_dir()``.
        text_path: another corpus (a UTF-8 file or a folder of ``.txt`` files) instead of tiny shakespeare.
        tokenizer: ``char`` or byte-level ``bpe``.
        bpe_vocab_size: BPE vocabulary size (256 bytes + merges).
        context_len: T, tokens per training window.
        batch_size: B.
        batches_per_epoch: training batches per (virtual) epoch; windows are random, so an epoch is a logging
            unit.
        val_fraction: tail fraction of the text used for validation.
        val_batch_size: batch size for validation.
        max_val_windows: cap on validation windows (None: the whole val split).
        seed: seed of the training window sampler.
        num_workers: DataLoader workers.
        cache_path: explicit cache folder (default under ``apps.datadir.cache_dir("lm")``).
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        text_path: str | None = None,
        tokenizer: Literal["char", "bpe"] = "char",
        bpe_vocab_size: int = 512,
        context_len: int = 64,
        batch_size: int = 12,
        batches_per_epoch: int = 500,
        val_fraction: float = 0.1,
        val_batch_size: int = 64,
        max_val_windows: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_path: str | None = None,
    ) -> None:
        super().__init__()
        if tokenizer not in ("char", "bpe"):
            raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
        for name, v in (("context_len", context_len), ("batch_size", batch_size),
                        ("batches_per_epoch", batches_per_epoch), ("val_batch_size", val_batch_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.save_hyperparameters()
        self.data_dir, self.text_path, self.tokenizer_kind = data_dir, text_path, tokenizer
        self.bpe_vocab_size, self.context_len, self.batch_size = bpe_vocab_size, context_len, batch_size
        self.batches_per_epoch, self.val_fraction, self.val_batch_size = (
            batches_per_epoch,
            val_fraction,
            val_batch_size,
        )
        self.max_val_windows, self.seed, self.num_workers = max_val_windows, seed, num_workers
        self.cache_path = cache_path
        self.folder: Path | None = None
        self.tokenizer = None
        self.meta: dict[str, Any] = {}

    def prepare_data(self) -> None:
        self._prepare()

    def _prepare(self) -> Path:
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
        return prepare_corpus(text_path=path, sha256=sha, tokenizer=self.tokenizer_kind,
                              bpe_vocab_size=self.bpe_vocab_size, val_fraction=self.val_fraction,
                              cache=Path(self.cache_path) if self.cache_path else None)

    def setup(self, stage: str | None = None) -> None:
        if self.folder is None:
            self.folder = self._prepare()
            self.meta = json.loads((self.folder / "meta.json").read_text())
            self.tokenizer = tokenizer_from_json((self.folder / "tokenizer.json").read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        self.setup()
        return self.tokenizer.vocab_size

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
        return ResumableLoader(ds, progress=self._progress, num_workers=self.num_workers,
                               generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        ds = FixedWindows(tokens=load_tokens(self.folder, "val"), context_len=self.context_len,
                          max_windows=self.max_val_windows)
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def test_dataloader(self) -> DataLoader:
        # tiny shakespeare has no test split (datasets/tinyshakespeare.md): test reports the validation split
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """``moekit lm predict`` scores the held-out windows (per-window NLL / perplexity); to continue a
        prompt use ``moekit lm generate``."""
        return self.val_dataloader()
