"""Corpus handling and evaluation metrics of the LM app (issue 17): WikiExtractor parsing and the wikipedia_en
split, a standard tokenizer.json, NUL-byte corpora refused, chunked encoding, sliding-window evaluation, bits
per byte and word-level perplexity against hand computations."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from apps.lm.data import (
    IGNORE_INDEX,
    FixedWindows,
    LMDataModule,
    encode_text,
    read_corpus,
    read_wikiextractor,
    wikipedia_splits,
)
from apps.lm.model import LMConfig, LMOutput
from apps.lm.task import LMTask, eval_metrics
from apps.lm.tokenizers import BPETokenizer, CharTokenizer, token_byte_table, tokenizer_from_json

TEXT = (
    "The media of New Zealand include television stations, radio stations and newspapers.\n"
    "Chen Zhili (; born November 1942) is a politician.\n\n  Indented  line with   spaces.\n"
) * 30

DOC = (
    '<doc id="1" url="http://en.wikipedia.org/wiki?curid=1" title="Greg &amp; Steve">\n'
    "Greg &amp; Steve\n\nGreg & Steve is a duo <br> of musicians.\n\n</doc>\n"
    '<doc id="2" url="http://en.wikipedia.org/wiki?curid=2" title="B">\n'
    "B\n\nSecond article.\nMore.\n\n</doc>\n"
)


def test_wikiextractor_parsing_drops_markup_lines_and_checks_balance(tmp_path):
    f = tmp_path / "wiki_01"
    f.write_text(DOC, encoding="utf-8")
    assert read_wikiextractor([f]) == (
        "Greg & Steve\nGreg & Steve is a duo <br> of musicians.\nB\nSecond article.\nMore.\n"
    )
    bad = tmp_path / "wiki_02"
    bad.write_text(DOC.replace("</doc>\n<doc", "<doc", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"wiki_02 line \d+: <doc> opened inside"):
        read_wikiextractor([bad])
    open_end = tmp_path / "wiki_03"
    open_end.write_text(DOC.rsplit("</doc>", 1)[0], encoding="utf-8")
    with pytest.raises(ValueError, match="wiki_03: the last <doc> is never closed"):
        read_wikiextractor([open_end])


def test_nul_byte_corpus_is_refused(tmp_path):
    (tmp_path / "nul.txt").write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match=r"nul.txt holds NUL bytes \(first at character 0, line 1\)"):
        read_corpus(tmp_path / "nul.txt")
    (tmp_path / "mixed.txt").write_bytes(b"hello\nworld\x00\n")
    with pytest.raises(ValueError, match="character 11, line 2"):
        read_corpus(tmp_path / "mixed.txt")
    dm = LMDataModule(text_path=str(tmp_path / "nul.txt"), tokenizer="bpe", context_len=8)
    with pytest.raises(ValueError, match="NUL bytes"):
        dm.setup()


def test_chunked_encoding_equals_whole_text_encoding():
    tok = BPETokenizer.fit(TEXT, vocab_size=400)
    ids = encode_text(tok, TEXT, what="t", chunk_chars=100)  # forces many chunks
    assert ids.tolist() == tok.encode(TEXT)


def test_standard_tokenizer_json_loads_in_tokenizers_and_transformers(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    dm = LMDataModule(text_path=str(tmp_path / "t.txt"), tokenizer="bpe", bpe_vocab_size=300, context_len=8)
    dm.setup()
    path = dm.folder / "tokenizer.json"
    from tokenizers import Tokenizer

    probe = "Zealand stations — héllo 日本\n\tend"
    hf = Tokenizer.from_file(str(path))
    assert hf.encode(probe).ids == dm.tokenizer.encode(probe)
    assert hf.decode(hf.encode(probe).ids) == probe
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert fast(probe)["input_ids"] == dm.tokenizer.encode(probe)
    assert fast.decode(fast(probe)["input_ids"]) == probe
    assert tokenizer_from_json(path.read_text()).encode(probe) == dm.tokenizer.encode(probe)


def test_token_byte_table_counts_bytes_and_words_by_hand():
    for tok in (BPETokenizer.fit(TEXT, vocab_size=350), CharTokenizer.fit(TEXT + "é")):
        table = torch.tensor(token_byte_table(tok))
        text = TEXT[:400] + "é end"
        ids = torch.tensor(tok.encode(text))
        x, y = ids[:-1], ids[1:]
        first = tok.decode(ids[:1].tolist())
        assert table[y, 0].sum().item() == len(text.encode()) - len(first.encode())
        words = (table[y, 1] + table[y, 2] * table[x, 3]).sum().item()
        assert not first[0].isspace()  # the first token starts the first word
        assert words == len(text.split()) - 1


def test_bits_per_byte_and_word_ppl_closed_form_for_a_uniform_model():
    """Zero logits: every target costs ln V nats, so bpb = n ln V / (ln 2 * bytes), word ppl = V^(n/words)."""
    tok = BPETokenizer.fit(TEXT, vocab_size=330)
    v = tok.vocab_size
    ids = torch.tensor(tok.encode(TEXT[:300]))[None]  # (1, n+1)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = IGNORE_INDEX  # context-only positions are not scored
    task = LMTask(config=LMConfig(vocab_size=v, context_len=512, dim=16, n_layers=1, n_heads=2))
    task.tokenizer = tok
    out = LMOutput(logits=torch.zeros(1, x.shape[1], v), routings=[])
    nll, n, nbytes, words = task._eval_sums(out, x, y).tolist()
    scored = y[0, 5:]
    text_bytes = len(tok.decode(ids[0, 6:].tolist()).encode())
    assert n == scored.numel() and nbytes == text_bytes
    assert nll == pytest.approx(n * math.log(v), rel=1e-6)  # float32 cross-entropy
    m = eval_metrics(nll, n, nbytes, words)
    assert m["bpb"] == pytest.approx(n * math.log2(v) / text_bytes, rel=1e-6)
    assert m["loss"] == pytest.approx(math.log(v)) and m["ppl"] == pytest.approx(v, rel=1e-6)
    full, prefix = tok.decode(ids[0].tolist()), tok.decode(ids[0, :6].tolist())
    assert words == len(full.split()) - len(prefix.split())  # words whose first byte is a scored target
    assert m["word_ppl"] == pytest.approx(math.exp(n * math.log(v) / words), rel=1e-5)


def test_sliding_windows_score_each_token_once_with_carried_context():
    tokens = np.arange(100, dtype=np.uint16)
    ds = FixedWindows(tokens=tokens, context_len=16, max_windows=None, stride=4)
    scored = []
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(x, torch.arange(4 * i, 4 * i + 16))
        keep = y != IGNORE_INDEX
        assert i == 0 or keep.sum() == 4 and bool(keep[-4:].all())  # later windows: last stride targets
        scored += y[keep].tolist()
    assert scored == list(range(1, 1 + len(scored))) and len(scored) >= 100 - 1 - 3  # once each, in order
    plain = FixedWindows(tokens=tokens, context_len=16, max_windows=None)
    assert len(plain) == 6 and bool((plain[5][1] != IGNORE_INDEX).all())
    with pytest.raises(ValueError, match="stride"):
        FixedWindows(tokens=tokens, context_len=16, max_windows=None, stride=17)


def test_named_test_file_is_the_test_split(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    held_out = "A held out test text about radio stations in New Zealand.\n" * 20
    (tmp_path / "test.txt").write_text(held_out, encoding="utf-8")
    dm = LMDataModule(text_path=str(tmp_path / "train.txt"), test_path=str(tmp_path / "test.txt"),
                      tokenizer="bpe", bpe_vocab_size=300, context_len=8, val_batch_size=4)
    dm.setup()
    assert dm.has_test_split and dm.meta["bytes"]["test"] == len(held_out.encode())
    test_ids = np.fromfile(dm.folder / "test.bin", dtype=dm.meta["dtype"])
    assert dm.tokenizer.decode(test_ids.tolist()) == held_out
    x, _ = next(iter(dm.test_dataloader()))
    assert torch.equal(x[0], torch.from_numpy(test_ids[:8].astype(np.int64)))
    plain = LMDataModule(text_path=str(tmp_path / "train.txt"), tokenizer="bpe", bpe_vocab_size=300,
                         context_len=8)
    assert not plain.has_test_split  # without test_path, test scores val (with a warning)


@pytest.mark.needs_data("wikipedia_en/AA/wiki_01", "wikipedia_en/AA/wiki_99")
@pytest.mark.slow
def test_wikipedia_split_word_counts_match_source(require_data):
    """SOURCE.txt: 7,505,260 whitespace words in all non-<doc>/</doc> lines (all 99 files); val (wiki_98..99)
    has 742 articles."""
    root = require_data("wikipedia_en/AA/wiki_01")
    splits = wikipedia_splits(root)
    assert sum(len(t.split()) for t in splits.values()) == 7_505_260
    raw = "".join((root / "wikipedia_en" / "AA" / f"wiki_{i}").read_text() for i in (98, 99))
    titles = re.findall(r'^<doc id="\d+" url="[^"]*" title="(.*)">$', raw, flags=re.M)
    assert len(titles) == 742
    assert "<doc" not in splits["val"] and "</doc>" not in splits["val"]


def test_a_given_tokenizer_file_is_used_instead_of_training_one(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    other = BPETokenizer.fit("completely different text about cats and dogs. " * 40, vocab_size=290)
    from apps.lm.tokenizers import save_tokenizer

    save_tokenizer(other, tmp_path / "tokenizer.json")
    dm = LMDataModule(text_path=str(tmp_path / "t.txt"), tokenizer_file=str(tmp_path / "tokenizer.json"),
                      context_len=8)
    dm.setup()
    assert dm.vocab_size == other.vocab_size
    ids = np.fromfile(dm.folder / "train.bin", dtype=dm.meta["dtype"])
    assert ids[:50].tolist() == other.encode(TEXT)[:50]
