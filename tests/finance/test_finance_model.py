"""MIGA invariants (docs/finance.md §12), baselines' shapes, task losses."""

from __future__ import annotations

import math

import pytest
import torch

from apps.finance.model import ALSTM, GRU, MIGA, MLP, Encoder, Transformer
from apps.finance.task import FinanceTask, pairwise_rank_loss, sq_balance, switch_balance
from moe_core.types import RouterOutput

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


def _group_attention_loop(m: MIGA, z: torch.Tensor, w: torch.Tensor, scope: str) -> torch.Tensor:
    """Oracle for ``MIGA.group_attention``, one stock, group, query and head at a time (float64).

    ``Z'_{g,i} = Z_{g,i} + W_o concat_h(sum_{j in keys} softmax_j(q_{i,h} . k_{j,h} / sqrt(d_h)) v_{j,h})
    + b_o`` with ``q, k, v`` the in-projections of the group's expert outputs. ``keys``: every expert of the
    group (``all``), or only those with combine weight > 0 (``selected``), all of them if none is selected.
    """
    attn = m.attn
    de, nh = m.expert_dim, attn.num_heads
    dh = de // nh
    wq, wk, wv = attn.in_proj_weight.double().detach().chunk(3)
    bq, bk, bv = attn.in_proj_bias.double().detach().chunk(3)
    wo, bo = attn.out_proj.weight.double().detach(), attn.out_proj.bias.double().detach()
    out = torch.empty(z.shape, dtype=torch.float64)
    for n in range(z.shape[0]):
        for g in range(m.G):
            experts = [g * m.M + j for j in range(m.M)]
            keys = experts
            if scope == "selected" and any(w[n, e] > 0 for e in experts):
                keys = [e for e in experts if w[n, e] > 0]
            for i in experts:
                q = wq @ z[n, i].double() + bq
                heads = []
                for h in range(nh):
                    sl = slice(h * dh, (h + 1) * dh)
                    scores = [float(q[sl] @ (wk @ z[n, j].double() + bk)[sl]) / math.sqrt(dh) for j in keys]
                    top = max(scores)
                    ex = [math.exp(sc - top) for sc in scores]
                    vals = [(wv @ z[n, j].double() + bv)[sl] for j in keys]
                    heads.append(sum(e / sum(ex) * v for e, v in zip(ex, vals)))
                out[n, i] = z[n, i].double() + wo @ torch.cat(heads) + bo
    return out


def _tiny_miga(scope: str, top_k: int = 2) -> MIGA:
    torch.manual_seed(0)
    return MIGA(
        num_features=F,
        step_len=T,
        hidden_dim=8,
        num_groups=2,
        experts_per_group=3,
        top_k=top_k,
        expert_dim=4,
        attention_heads=2,
        attention_scope=scope,
    )


@pytest.mark.parametrize("scope", ["all", "selected"])
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])  # eval + no_grad takes MHA's fused fast path
def test_group_attention_matches_loop_oracle(scope, mode):
    m = _tiny_miga(scope)
    z = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
    w = torch.zeros(3, 6)  # experts 0-2 are group 0, experts 3-5 group 1
    w[0, [0, 2]] = torch.tensor([0.7, 0.3])  # stock 0: two of group 0; nothing in group 1 (keeps all keys)
    w[1, [1, 3, 5]] = torch.tensor([0.5, 0.2, 0.3])  # stock 1: one key in group 0, two in group 1
    w[2, [4]] = 1.0  # stock 2: nothing in group 0, one key in group 1
    want = _group_attention_loop(m, z, w, scope)
    if mode == "train":
        got = m.train().group_attention(z, w)
    else:
        with torch.no_grad():
            got = m.eval().group_attention(z, w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the oracle tells the scopes apart on this input
    other = _group_attention_loop(m, z, w, "all" if scope == "selected" else "selected")
    assert not torch.allclose(other, want, atol=1e-3)
    if scope == "selected":  # a single selected key: every query of the group reads exactly its value
        attn = m.attn
        v = z[1, 1] @ attn.in_proj_weight.chunk(3)[2].t() + attn.in_proj_bias.chunk(3)[2]
        for i in range(3):
            torch.testing.assert_close(got[1, i], z[1, i] + attn.out_proj(v), rtol=1e-5, atol=1e-5)


def test_selected_scope_ignores_unselected_experts_end_to_end():
    """Changing expert e's output changes the score of a stock exactly when e is selected for it (scope
    ``selected``); with scope ``all`` it also changes stocks that select another expert of e's group."""
    x = x_(40)
    seen_chosen = seen_neighbour = 0
    for e in range(6):  # experts 0-2 are group 0, 3-5 group 1
        ms = _tiny_miga("selected").eval()
        ma = _tiny_miga("all").eval()  # same seed: same weights
        with torch.no_grad():
            out = ms(x)
            sel = out.routing.dense_weights() > 0  # (N, E); routing does not depend on the experts
            before = {"selected": out.score, "all": ma(x).score}
            for m in (ms, ma):
                m.b[e] += torch.tensor([1.0, -2.0, 0.5, 3.0])  # shifts expert e's output z_e for every stock
            after = {"selected": ms(x).score, "all": ma(x).score}
        group = [j for j in range(3 * (e // 3), 3 * (e // 3) + 3) if j != e]
        chosen = sel[:, e]
        neighbour = ~chosen & sel[:, group].any(-1)  # e unselected, but another expert of its group is used
        d_sel = (after["selected"] - before["selected"]).abs()
        d_all = (after["all"] - before["all"]).abs()
        assert float(d_sel[~chosen].max()) == 0.0  # bit-identical for every stock that does not select e
        if chosen.any():
            assert float(d_sel[chosen].min()) > 1e-4  # a selected expert's change reaches the score
        if neighbour.any():  # with "all", e is a key of its group's selected experts
            assert float(d_all[neighbour].min()) > 1e-4
        seen_chosen += int(chosen.sum())
        seen_neighbour += int(neighbour.sum())
    assert seen_chosen == 80 and seen_neighbour >= 20, (seen_chosen, seen_neighbour)  # 40 stocks x top-2
    ms1 = _tiny_miga("selected", top_k=1)  # top-1: one group is always empty; keeping all keys, not NaN
    assert torch.isfinite(ms1(x).score).all()


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


def _balance_loops(probs: torch.Tensor, indices: torch.Tensor) -> tuple[float, float]:
    """Oracle: Switch ``E sum_i f_i P_i`` (f_i = share of the N*K slots on i) and ``E sum_i P_i^2``."""
    n, k = indices.shape
    e = probs.shape[1]
    p = [sum(float(probs[t, i]) for t in range(n)) / n for i in range(e)]
    f = [sum(int(indices[t, j]) == i for t in range(n) for j in range(k)) / (n * k) for i in range(e)]
    return e * sum(fi * pi for fi, pi in zip(f, p)), e * sum(pi * pi for pi in p)


def _fixed(probs: torch.Tensor, indices: torch.Tensor) -> RouterOutput:
    return RouterOutput(logits=probs.log(), probs=probs, weights=probs.gather(1, indices), indices=indices)


def test_balance_losses():
    """MIGA's balance terms equal a loop oracle on a real MIGA routing, and take their known values: 1 at
    perfect balance, E at collapse onto one expert."""
    m = MIGA(
        num_features=F, step_len=T, hidden_dim=8, num_groups=2, experts_per_group=2, top_k=2, expert_dim=4
    )
    r = m(x_(40)).routing
    r.probs = r.probs.detach().requires_grad_()  # a leaf, to read dL/dprobs below
    switch_want, sq_want = _balance_loops(r.probs.detach(), r.indices)
    assert switch_want != pytest.approx(1.0, abs=0.01)  # an uneven routing, not a balanced one
    assert float(switch_balance(r).detach()) == pytest.approx(switch_want, rel=1e-6)
    assert float(sq_balance(r).detach()) == pytest.approx(sq_want, rel=1e-6)
    # gradient reaches the router only through P: dL/dprobs[t, i] = E f_i / N (counts are constants)
    (grad,) = torch.autograd.grad(switch_balance(r), r.probs)
    f = torch.bincount(r.indices.flatten(), minlength=4).float() / r.indices.numel()
    torch.testing.assert_close(grad, (4 * f / 40).expand(40, 4))

    e, n = 4, 8
    uniform = torch.full((n, e), 1 / e)
    spread = (torch.arange(n)[:, None] + torch.arange(2)[None]) % e  # every expert gets n*k/e slots
    assert float(switch_balance(_fixed(uniform, spread))) == pytest.approx(1.0)
    assert float(sq_balance(_fixed(uniform, spread))) == pytest.approx(1.0)
    onehot = torch.zeros(n, e)
    onehot[:, 2] = 1.0
    collapsed = _fixed(onehot.clamp_min(1e-30), torch.full((n, 1), 2))
    assert float(switch_balance(collapsed)) == pytest.approx(e)
    assert float(sq_balance(collapsed)) == pytest.approx(e)
