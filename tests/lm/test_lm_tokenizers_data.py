"""Tokenizers and token shards: round trips, the split sizes of datasets/tinyshakespeare.md, clear errors,
deterministic windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apps.lm.data import LMDataModule, RandomWindows, read_corpus, split_text
from apps.lm.tokenizers import BPETokenizer, CharTokenizer, tokenizer_from_json

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def test_char_tokenizer_round_trip_and_vocab_order():
    tok = CharTokenizer.fit(SAMPLE)
    assert tok.chars == sorted(set(SAMPLE))
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tokenizer_from_json(tok.to_json()).encode("Speak") == tok.encode("Speak")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("Z~")


def test_bpe_round_trip_unseen_unicode_and_reload():
    tok = BPETokenizer.fit(SAMPLE, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    text = "Speak, speak! héllo — 日本 \n\t end"
    assert tok.decode(tok.encode(text)) == text  # byte-level: anything round-trips
    assert len(tok.encode("Speak, speak.")) < len("Speak, speak.")  # merges were learned
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(text) == tok.encode(text)


def test_shakespeare_char_split_matches_data_spec(shakespeare_path):
    dm = LMDataModule(tokenizer="char", context_len=16, batch_size=2)
    dm.setup()
    assert dm.vocab_size == 65
    assert dm.meta["chars"] == {"train": 1_003_854, "val": 111_540}
    text = shakespeare_path.read_text(encoding="utf-8")
    train = np.fromfile(dm.folder / "train.bin", dtype=np.uint16)
    val = np.fromfile(dm.folder / "val.bin", dtype=np.uint16)
    assert dm.meta["dtype"] == "uint16" and len(train) == 1_003_854 and len(val) == 111_540
    # the stored ids decode back to the exact text: train is the head, val the tail, no overlap
    assert dm.tokenizer.decode(train.tolist()) + dm.tokenizer.decode(val.tolist()) == text


def test_other_corpus_folder_and_bad_files(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("abc " * 200, encoding="utf-8")
    (folder / "b.txt").write_text("xyz " * 200, encoding="utf-8")
    assert read_corpus(folder) == "abc " * 200 + "\n" + "xyz " * 200
    dm = LMDataModule(text_path=str(folder), tokenizer="char", context_len=8, batch_size=2)
    dm.setup()
    assert dm.vocab_size == len(set("abc xyz\n"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_corpus(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_corpus(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no .txt"):
        (tmp_path / "void").mkdir()
        read_corpus(tmp_path / "void")
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("abc", 1.5)


def test_random_windows_are_seeded_targets_shifted_and_worker_independent():
    tokens = np.arange(1000, dtype=np.uint16)
    ds = RandomWindows(tokens=tokens, context_len=8, batch_size=3, batches_per_epoch=5, seed=7)
    a = list(ds)
    b = list(RandomWindows(tokens=tokens, context_len=8, batch_size=3, batches_per_epoch=5, seed=7))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    x, y = a[0]
    assert x.shape == (3, 8) and torch.equal(y, x + 1)  # arange corpus: target = next token
    ds.start = 2  # resuming mid-epoch serves exactly the remaining batches
    assert all(torch.equal(p[0], q[0]) for p, q in zip(list(ds), a[2:]))
    loader = torch.utils.data.DataLoader(
        RandomWindows(tokens=tokens, context_len=8, batch_size=3, batches_per_epoch=5, seed=7),
        batch_size=None,
        num_workers=2,
    )
    assert all(torch.equal(p[0], q[0]) for p, q in zip(list(loader), a))
    other = list(RandomWindows(tokens=tokens, context_len=8, batch_size=3, batches_per_epoch=5, seed=8))
    assert not torch.equal(other[0][0], a[0][0])


def test_cache_meta_written(tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 100, encoding="utf-8")
    dm = LMDataModule(text_path=str(tmp_path / "t.txt"), tokenizer="bpe", bpe_vocab_size=270, context_len=8)
    dm.setup()
    meta = json.loads((dm.folder / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == dm.vocab_size
    assert meta["tokens"]["train"] == len(np.fromfile(dm.folder / "train.bin", dtype=meta["dtype"]))
