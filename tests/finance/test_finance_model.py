"""MIGA invariants (spec/finance.md §12), baselines' shapes, task losses."""

from __future__ import annotations

import pytest
import torch

from apps.finance.model import ALSTM, GRU, MIGA, MLP, Encoder, Transformer
from apps.finance.task import FinanceTask, pairwise_rank_loss, sq_balance, switch_balance

F, T = 6, 3


def x_(n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, T, F, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("enc", ["linear", "conv1d", "gru", "transformer"])
def test_miga_shapes_and_routing(enc):
    torch.manual_seed(0)
    m = MIGA(
        num_features=F,
        step_len=T,
        encoder=enc,
        hidden_dim=8,
        num_groups=2,
        experts_per_group=3,
        top_k=2,
        expert_dim=4,
        attention_heads=2,
    )
    out = m(x_())
    assert out.score.shape == (9,)
    torch.testing.assert_close(out.routing.weights.sum(-1), torch.ones(9))
    assert out.routing.indices.shape == (9, 2)
    out.score.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if not n.startswith("router"))


def test_miga_single_expert_is_encoder_plus_linear_head():
    torch.manual_seed(0)
    m = MIGA(
        num_features=F,
        step_len=T,
        hidden_dim=8,
        num_groups=1,
        experts_per_group=1,
        top_k=1,
        expert_dim=3,
        inner_attention=False,
    )
    x = x_()
    h = m.encoder(x)
    w_eff = m.w[0] @ m.readout[0]  # (H,)
    b_eff = m.b[0] @ m.readout[0] + m.readout_bias[0]
    torch.testing.assert_close(m(x).score, h @ w_eff + b_eff)


def test_dense_mixture_of_identical_experts_is_one_head():
    torch.manual_seed(0)
    m = MIGA(
        num_features=F,
        step_len=T,
        hidden_dim=8,
        num_groups=2,
        experts_per_group=2,
        top_k=4,
        expert_dim=3,
        inner_attention=False,
    )
    with torch.no_grad():
        m.w[:] = m.w[0]
        m.b[:] = m.b[0]
        m.readout[:] = m.readout[0]
        m.readout_bias[:] = m.readout_bias[0]
    x = x_()
    h = m.encoder(x)
    torch.testing.assert_close(
        m(x).score, h @ (m.w[0] @ m.readout[0]) + m.b[0] @ m.readout[0] + m.readout_bias[0]
    )


def test_permutation_equivariance_over_stocks():
    torch.manual_seed(0)
    m = MIGA(num_features=F, step_len=T, hidden_dim=8, expert_dim=4).eval()
    x = x_(12)
    perm = torch.randperm(12)
    torch.testing.assert_close(m(x[perm]).score, m(x).score[perm])


def test_group_attention_is_local_to_a_group():
    torch.manual_seed(0)
    m = MIGA(
        num_features=F, step_len=T, hidden_dim=8, num_groups=3, experts_per_group=2, top_k=2, expert_dim=4
    )
    z = torch.randn(5, 6, 4)
    w = torch.rand(5, 6)
    z2 = z.clone()
    z2[:, 2:4] += torch.randn(5, 2, 4)  # perturb group 1 only
    a, b = m.group_attention(z, w), m.group_attention(z2, w)
    torch.testing.assert_close(a[:, [0, 1, 4, 5]], b[:, [0, 1, 4, 5]])
    assert not torch.allclose(a[:, 2:4], b[:, 2:4])
    ms = MIGA(
        num_features=F,
        step_len=T,
        hidden_dim=8,
        num_groups=2,
        experts_per_group=2,
        top_k=1,
        expert_dim=4,
        attention_scope="selected",
    )
    assert torch.isfinite(ms(x_()).score).all()  # groups with nothing selected do not produce NaN


def test_bad_arguments():
    with pytest.raises(ValueError, match="encoder"):
        Encoder(kind="lstmx", num_features=F, step_len=T, hidden_dim=4)
    with pytest.raises(ValueError, match="attention_heads"):
        MIGA(num_features=F, step_len=T, expert_dim=3, attention_heads=2)
    with pytest.raises(ValueError, match="top_k"):
        MIGA(num_features=F, step_len=T, num_groups=1, experts_per_group=2, top_k=3, expert_dim=4)
    with pytest.raises(ValueError, match="shape"):
        MIGA(num_features=F, step_len=T, expert_dim=4)(torch.randn(4, T, F + 1))
    with pytest.raises(ValueError, match="loss"):
        FinanceTask(model=MLP(num_features=F), loss="huber")


@pytest.mark.parametrize("cls", [MLP, GRU, ALSTM, Transformer])
def test_baselines(cls):
    kw = {"num_heads": 2} if cls is Transformer else {}
    m = cls(num_features=F, step_len=T, hidden_dim=8, **kw)
    out = m(x_())
    assert out.score.shape == (9,) and out.routing is None


def test_losses():
    torch.manual_seed(0)
    pred, y = torch.randn(50), torch.randn(50)
    t = FinanceTask(model=MLP(num_features=F), loss="ic")
    l1 = t.task_loss(pred, y)
    torch.testing.assert_close(t.task_loss(3 * pred + 2, y), l1)  # invariant to positive affine maps
    assert t.task_loss(torch.ones(5), torch.randn(5)).item() == 0.0  # degenerate day: skipped, not NaN
    assert pairwise_rank_loss(y, y).item() < pairwise_rank_loss(-y, y).item()
    m = MIGA(
        num_features=F, step_len=T, hidden_dim=8, num_groups=2, experts_per_group=2, top_k=1, expert_dim=4
    )
    r = m(x_(40)).routing
    assert switch_balance(r).item() > 0
    r.probs = torch.full_like(r.probs, 0.25)
    torch.testing.assert_close(sq_balance(r), torch.tensor(1.0))  # 1 at uniform
