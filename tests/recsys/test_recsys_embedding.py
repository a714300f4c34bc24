"""FeatureEmbedding: the fused table equals one nn.Embedding per column (oracle), guards column bounds, and
loads checkpoints written with one table per column."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apps.recsys.model import FeatureEmbedding

CARDS, D, F = [3, 1, 7, 4], 5, 2


def _batch(b: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cat = torch.stack([torch.randint(0, c, (b,), generator=g) for c in CARDS], 1)  # (B, C)
    return cat, torch.randn(b, F, generator=g)


def test_fused_table_equals_per_column_tables_in_values_and_gradients():
    torch.manual_seed(0)
    emb = FeatureEmbedding(cardinalities=CARDS, num_numeric=F, embed_dim=D)
    tables = [nn.Embedding(c, D) for c in CARDS]
    with torch.no_grad():
        for t, w in zip(tables, emb.table.weight.split(CARDS)):
            t.weight.copy_(w)
    cat, num = _batch()
    out = emb(cat, num)
    ref = torch.cat([t(cat[:, j]) for j, t in enumerate(tables)] + [num], -1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(emb.table.weight.grad, torch.cat([t.weight.grad for t in tables]))


def test_out_of_range_index_names_the_column():
    emb = FeatureEmbedding(cardinalities=CARDS, num_numeric=F, embed_dim=D)
    cat, num = _batch()
    cat[3, 2] = 7  # column 2 has 7 rows: 7 would read column 3's first row in the fused table
    with pytest.raises(ValueError, match="categorical column 2 has index 7 outside its table"):
        emb(cat, num)
    cat[3, 2] = -1
    with pytest.raises(ValueError, match="column 2"):
        emb(cat, num)


def test_loads_a_checkpoint_with_one_table_per_column():
    emb = FeatureEmbedding(cardinalities=CARDS, num_numeric=F, embed_dim=D)
    old = {f"tables.{j}.weight": torch.randn(c, D) for j, c in enumerate(CARDS)}
    emb.load_state_dict(old)
    cat, num = _batch()
    ref = torch.cat([old[f"tables.{j}.weight"][cat[:, j]] for j in range(len(CARDS))] + [num], -1)
    torch.testing.assert_close(emb(cat, num), ref)
