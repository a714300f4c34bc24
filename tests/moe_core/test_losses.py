"""Auxiliary losses (balance-loss table in docs/moe_core.md): balanced-fixture values, collapse values,
closed-form gradients, HF transformers' Mixtral loss as an independent implementation, permutation and
padding invariance."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import losses as L
from moe_core import routers as R
from moe_core.types import RouterOutput

D = 8


def _balanced(t: int = 8, e: int = 4, k: int = 2) -> RouterOutput:
    """Spec fixture "perfect balance": zero logits, token t -> experts (t + j) mod E, j < k."""
    logits = torch.zeros(t, e)
    probs = logits.softmax(-1)
    idx = (torch.arange(t)[:, None] + torch.arange(k)[None]) % e  # (T, K)
    return RouterOutput(logits=logits, probs=probs, weights=probs.gather(1, idx), indices=idx)


def _collapsed(t: int = 8, e: int = 4) -> RouterOutput:
    probs = torch.zeros(t, e)
    probs[:, 0] = 1.0
    idx = torch.zeros(t, 1, dtype=torch.long)
    return RouterOutput(logits=torch.log(probs.clamp_min(1e-30)), probs=probs, weights=torch.ones(t, 1),
                        indices=idx)


def _routed(router: torch.nn.Module, n: int = 24, seed: int = 0) -> RouterOutput:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return router(torch.randn(n, D, generator=g))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balanced_fixture_values(k):
    r = _balanced(t=8, e=4, k=k)
    assert float(L.switch_balance_loss(r)) == pytest.approx(1.0)
    assert float(L.deepseek_balance_loss(r)) == pytest.approx(1.0)
    assert float(L.deepseek_balance_loss(r, level="device", num_devices=2)) == pytest.approx(1.0)
    assert float(L.deepseek_balance_loss(r, batch_size=2)) == pytest.approx(1.0)
    assert float(L.router_z_loss(r)) == pytest.approx(math.log(4) ** 2)
    assert float(L.top_p_entropy_loss(r)) == pytest.approx(math.log(4))


def test_collapse_values():
    r = _collapsed(e=4)
    assert float(L.switch_balance_loss(r)) == pytest.approx(4.0)
    assert float(L.deepseek_balance_loss(r)) == pytest.approx(4.0)
    assert float(L.top_p_entropy_loss(r)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_switch_loss_matches_hf_mixtral_divided_by_k(k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    out = _routed(R.TopKRouter(dim=D, num_experts=6, top_k=k))
    hf = mixtral.load_balancing_loss_func((out.logits,), num_experts=6, top_k=k)
    torch.testing.assert_close(L.switch_balance_loss(out) * k, hf.float(), atol=1e-6, rtol=1e-6)


def test_switch_loss_padding_matches_hf_attention_mask():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    out = _routed(R.TopKRouter(dim=D, num_experts=4, top_k=2), n=12)
    attn = torch.ones(2, 6, dtype=torch.long)
    attn[0, 4:] = 0
    attn[1, 5:] = 0
    hf = mixtral.load_balancing_loss_func((out.logits,), num_experts=4, top_k=2, attention_mask=attn)
    ours = L.switch_balance_loss(out, token_mask=attn.reshape(-1).bool())
    torch.testing.assert_close(ours * 2, hf.float(), atol=1e-6, rtol=1e-6)


def test_padding_tokens_do_not_change_losses():
    out = _routed(R.TopKRouter(dim=D, num_experts=4, top_k=2), n=16)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:10] = True
    sub = RouterOutput(logits=out.logits[:10], probs=out.probs[:10], weights=out.weights[:10],
                       indices=out.indices[:10])
    for fn in (L.switch_balance_loss, L.router_z_loss, L.top_p_entropy_loss, L.deepseek_balance_loss):
        torch.testing.assert_close(fn(out, token_mask=keep), fn(sub))


@pytest.mark.parametrize(
    "loss",
    [
        L.switch_balance_loss,
        L.router_z_loss,
        L.top_p_entropy_loss,
        L.deepseek_balance_loss,
        lambda r: L.deepseek_balance_loss(r, level="device", num_devices=2),
    ],
)
def test_token_permutation_invariance(loss):
    out = _routed(R.TopKRouter(dim=D, num_experts=4, top_k=2), n=20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(5))
    shuffled = RouterOutput(logits=out.logits[perm], probs=out.probs[perm], weights=out.weights[perm],
                            indices=out.indices[perm])
    torch.testing.assert_close(loss(out), loss(shuffled))


def test_switch_gradient_moves_probability_away_from_overloaded_experts():
    out = _routed(R.TopKRouter(dim=D, num_experts=4, top_k=1), n=32)
    probs = out.probs.detach().requires_grad_(True)
    r = RouterOutput(logits=out.logits, probs=probs, weights=out.weights, indices=out.indices)
    L.switch_balance_loss(r).backward()
    f = out.counts().float() / out.counts().sum()
    grad_p = probs.grad.mean(0)  # dL/dP_i up to 1/T
    assert float((grad_p * (f - f.mean())).sum()) > 0


def test_z_loss_closed_form_gradient_and_not_shift_invariant():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    r = RouterOutput(logits=logits, probs=logits.softmax(-1), weights=torch.ones(6, 1),
                     indices=torch.zeros(6, 1, dtype=torch.long))
    loss = L.router_z_loss(r)
    loss.backward()
    with torch.no_grad():
        lse = torch.logsumexp(logits, -1, keepdim=True)
        expected = 2.0 / 6 * lse * logits.softmax(-1)
        assert float(loss) == pytest.approx(float((lse**2).mean()), rel=1e-6)
    torch.testing.assert_close(logits.grad, expected)
    shifted = RouterOutput(logits=logits.detach() + 1.0, probs=r.probs, weights=r.weights, indices=r.indices)
    assert float(L.router_z_loss(shifted)) != pytest.approx(float(loss.detach()))
    assert float(loss.detach()) >= 0


def test_deepseek_device_level_one_expert_per_device_equals_expert_level():
    out = _routed(R.TopKRouter(dim=D, num_experts=4, top_k=2))
    torch.testing.assert_close(
        L.deepseek_balance_loss(out, level="device", num_devices=4), L.deepseek_balance_loss(out)
    )


def test_deepseek_device_level_formula():
    out = _routed(R.TopKRouter(dim=D, num_experts=6, top_k=2))
    counts = out.counts().float()
    f = 6 * counts / counts.sum()
    p = out.probs.mean(0)
    expected = sum(f[d * 2 : d * 2 + 2].mean() * p[d * 2 : d * 2 + 2].sum() for d in range(3))
    torch.testing.assert_close(L.deepseek_balance_loss(out, level="device", num_devices=3), expected)


def test_deepseek_sequence_wise_is_mean_over_sequences():
    out = _routed(R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2), n=18)
    parts = []
    for b in range(3):
        s = slice(6 * b, 6 * b + 6)
        part = RouterOutput(logits=out.logits[s], probs=out.probs[s], weights=out.weights[s],
                            indices=out.indices[s])
        parts.append(L.deepseek_balance_loss(part, normalize_scores=True))
    torch.testing.assert_close(
        L.deepseek_balance_loss(out, batch_size=3, normalize_scores=True), torch.stack(parts).mean()
    )


def _deepseek_sequence_wise_loop(probs: torch.Tensor, indices: torch.Tensor, b: int, e: int, k: int) -> float:
    """DeepSeek-V3 (arXiv 2412.19437 eqs. 17-20) complementary sequence-wise loss, written per sequence.

    For each of the ``b`` sequences of T consecutive tokens: ``s'_{t,i} = s_{t,i} / sum_j s_{t,j}``,
    ``f_i = E / (K T) * #{t in the sequence : i in TopK(t)}``, ``P_i = (1/T) sum_t s'_{t,i}``, loss
    ``sum_i f_i P_i``; the batch value is the mean over sequences.
    """
    n = probs.shape[0]
    t_len = n // b
    per_seq = []
    for seq in range(b):
        rows = range(seq * t_len, (seq + 1) * t_len)
        total = 0.0
        for i in range(e):
            count = sum(1 for t in rows if i in indices[t].tolist())
            f_i = e / (k * t_len) * count
            p_i = sum(float(probs[t, i]) / float(probs[t, :e].sum()) for t in rows) / t_len
            total += f_i * p_i
        per_seq.append(total)
    return sum(per_seq) / b


def test_deepseek_sequence_wise_normalized_matches_paper_loop():
    e, k, b = 6, 2, 3
    router = R.SigmoidTopKRouter(dim=D, num_experts=e, top_k=k, use_bias=False)
    with torch.no_grad():
        out = _routed(router, n=b * 8, seed=3)
    counts = [torch.bincount(out.indices[8 * s : 8 * s + 8].flatten(), minlength=e) for s in range(b)]
    assert all(int(c.max()) - int(c.min()) >= 3 for c in counts), counts  # uneven routing in every sequence
    assert not torch.equal(counts[0], counts[1])  # and differently in different sequences
    assert float((out.probs.sum(-1) - 1).abs().min()) > 0.1  # sigmoid scores: normalising changes them
    want = _deepseek_sequence_wise_loop(out.probs.double(), out.indices, b, e, k)
    got = L.deepseek_balance_loss(out, batch_size=b, normalize_scores=True)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # the oracle separates the variants: without normalisation, or over the whole batch, the value differs
    assert float(L.deepseek_balance_loss(out, batch_size=b)) != pytest.approx(want, rel=1e-3)
    assert float(L.deepseek_balance_loss(out, normalize_scores=True)) != pytest.approx(want, rel=1e-3)


def test_null_balance_loss():
    r = R.NullExpertRouter(dim=D, num_experts=4, num_null=3, top_k=3)
    out = _routed(r)
    # m = 0 equals the switch form
    r0 = R.NullExpertRouter(dim=D, num_experts=4, num_null=0, top_k=2)
    out0 = _routed(r0)
    torch.testing.assert_close(L.null_expert_balance_loss(out0), L.switch_balance_loss(out0))
    # permuting the null logits (columns E..E+m) leaves the loss unchanged
    perm = torch.tensor([0, 1, 2, 3, 6, 4, 5])
    picks = out.aux["all_indices"]
    inv = torch.argsort(perm)
    permuted = RouterOutput(
        logits=out.logits[:, perm], probs=out.probs[:, perm], weights=out.weights, indices=out.indices,
        mask=out.mask, aux={**out.aux, "all_indices": inv[picks]},
    )
    torch.testing.assert_close(L.null_expert_balance_loss(permuted), L.null_expert_balance_loss(out))
    # oracle: Switch form over E + m buckets with null counts averaged
    counts = torch.bincount(picks.flatten(), minlength=7).float()
    counts[4:] = counts[4:].mean()
    expected = 7 * (counts / counts.sum() * out.probs.mean(0)).sum()
    torch.testing.assert_close(L.null_expert_balance_loss(out), expected)
    # balanced fixture over E + m buckets gives 1
    t, n_b = 7, 7
    logits = torch.zeros(t, n_b)
    picks_b = (torch.arange(t)[:, None] + torch.arange(3)[None]) % n_b
    bal = RouterOutput(logits=logits, probs=logits.softmax(-1), weights=torch.ones(t, 3),
                       indices=picks_b.clamp_max(3), mask=picks_b < 4,
                       aux={"num_experts": torch.tensor(4), "num_null": torch.tensor(3),
                            "all_indices": picks_b})
    assert float(L.null_expert_balance_loss(bal)) == pytest.approx(1.0)


def test_top_p_entropy_range():
    out = _routed(R.TopPRouter(dim=D, num_experts=5))
    ent = float(L.top_p_entropy_loss(out).detach())
    assert 0 < ent < math.log(5)
    p = out.probs.detach()
    assert ent == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-6)


def test_noisy_load_importance_loss():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert float(L.cv_squared(x)) == pytest.approx(float(x.var() / x.mean() ** 2), rel=1e-6)
    assert float(L.cv_squared(torch.full((4,), 3.0))) == 0.0
    r = R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2)  # zero-initialised: all logits tie
    out = r.eval()(torch.randn(8, D))
    torch.testing.assert_close(out.aux["load_probs"], torch.full((8, 4), 0.5))  # Phi(0): uniform load
    imp = out.dense_weights().sum(0).detach()
    loss = L.noisy_load_importance_loss(out).detach()
    assert float(loss) == pytest.approx(float(L.cv_squared(imp)), abs=1e-6)  # only the importance term
    skew = _routed(R.NoisyTopKRouter(dim=D, num_experts=4, top_k=1))
    expected = 0.1 * L.cv_squared(skew.dense_weights().sum(0)) + 0.2 * L.cv_squared(
        skew.aux["load_probs"].sum(0))
    torch.testing.assert_close(L.noisy_load_importance_loss(skew, w_importance=0.1, w_load=0.2), expected)
    assert float(expected.detach()) > 0


def test_switch_global_counts():
    out = _routed(R.TopKRouter(dim=D, num_experts=4, top_k=2))
    torch.testing.assert_close(L.switch_balance_loss(out, counts=out.counts()), L.switch_balance_loss(out))
    # uniform global counts: E * sum_i (1/E) P_i = sum_i P_i = 1 for softmax probabilities
    torch.testing.assert_close(L.switch_balance_loss(out, counts=torch.full((4,), 7)), torch.tensor(1.0))
    with pytest.raises(ValueError, match="counts"):
        L.switch_balance_loss(out, counts=torch.ones(3))


def test_loss_errors():
    out = _routed(R.TopKRouter(dim=D, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="token_mask"):
        L.switch_balance_loss(out, token_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="level"):
        L.deepseek_balance_loss(out, level="node")
    with pytest.raises(ValueError, match="num_devices"):
        L.deepseek_balance_loss(out, level="device")
    with pytest.raises(ValueError, match="batch_size"):
        L.deepseek_balance_loss(out, batch_size=5)
    with pytest.raises(ValueError, match="NullExpertRouter"):
        L.null_expert_balance_loss(out)
    with pytest.raises(ValueError, match="NoisyTopKRouter"):
        L.noisy_load_importance_loss(out)
