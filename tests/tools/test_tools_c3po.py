"""C3PO: routing override, kernel regression, neighbourhood gradient descent."""

import math

import pytest
import torch

from moe_core.blocks import find_moe_blocks
from moe_core.inference.c3po import (
    collect_pathways,
    critical_blocks,
    kernel_regression,
    neighbourhood_gd,
    remix,
    remixed_logits,
)
from moe_core.inference.override import RoutingOverride, last_token_index


def _block_outputs(model, ids):
    outs = []
    hooks = [
        r.block.register_forward_hook(
            lambda m, i, o: outs.append(o if isinstance(o, torch.Tensor) else o.output)
        )
        for r in find_moe_blocks(model)
    ]
    with torch.no_grad():
        logits = model(ids)
    for h in hooks:
        h.remove()
    return (logits if isinstance(logits, torch.Tensor) else logits.logits), outs


@pytest.mark.parametrize("kind", ["moekit", "olmoe", "mixtral"])
def test_override_with_own_routing_changes_nothing(tiny_lm, hf_moe, kind):
    model = tiny_lm() if kind == "moekit" else hf_moe(kind, 2)
    ids = torch.randint(0, 31, (3, 8))
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    own = collect_pathways(model, ids, blocks=blocks)  # (B, L, E)
    want, _ = _block_outputs(model, ids)
    with torch.no_grad():
        got = remixed_logits(model, ids, own, blocks=blocks)
    assert torch.equal(got, want)


def test_untouched_layers_and_positions_are_bit_identical(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (2, 6))
    want_logits, want = _block_outputs(model, ids)
    e = find_moe_blocks(model)[-1].router.num_experts
    omega = torch.softmax(torch.randn(2, e) * 3, -1)
    with RoutingOverride(model, omegas={-1: omega}, token_index=last_token_index(2, 6)):
        got_logits, got = _block_outputs(model, ids)
    for a, b in zip(got[:-1], want[:-1]):
        assert torch.equal(a, b)  # earlier layers
    # other positions of the overridden layer keep their routing; their values can differ in the last ulp only
    # because an expert's matmul then sees a different number of rows (BLAS blocking), hence allclose here
    torch.testing.assert_close(got[-1][:, :-1], want[-1][:, :-1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got[-1][:, -1], want[-1][:, -1], atol=1e-4)  # the override did something
    torch.testing.assert_close(got_logits[:, :-1], want_logits[:, :-1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="omega"):
        with RoutingOverride(model, omegas={0: omega[:1]}, token_index=last_token_index(2, 6)):
            model(ids)


def _kernel_regression_loop(query, refs, paths, k, kernel, bandwidth=1.0):
    """Oracle: one query at a time, plain Python over the references, float64.

    C3PO (tianyi-lab/C3PO olmoe_optimizer.py): the k references nearest the query (largest cosine similarity,
    or smallest Euclidean distance for the Gaussian kernel), weights ``K_i / sum_j K_j`` with
    ``K = max(cos, 1e-6)`` or ``exp(-d^2 / (2 h^2))``, pathway ``sum_i weight_i * pathway_i``.
    """
    out = []
    for q in query.double():
        scored = []
        for i, r in enumerate(refs.double()):
            if kernel == "cosine":
                cos = float(q @ r) / (math.sqrt(float(q @ q)) * math.sqrt(float(r @ r)))
                scored.append((-cos, i, max(cos, 1e-6)))  # sort key: most similar first
            else:
                d = math.sqrt(float(((q - r) ** 2).sum()))
                scored.append((d, i, math.exp(-(d**2) / (2 * bandwidth**2))))
        nearest = sorted(scored)[:k]
        total = sum(w for _, _, w in nearest)
        mixed = sum((w / total) * paths[i].double() for _, i, w in nearest)  # (L, E)
        out.append(mixed / mixed.sum(-1, keepdim=True))
    return torch.stack(out)  # (Q, L, E)


@pytest.mark.parametrize("kernel,bandwidth", [("cosine", 1.0), ("gaussian", 1.0), ("gaussian", 3.0)])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_kernel_regression_matches_loop_oracle(kernel, bandwidth, k):
    """Top-k > 1: the weighted average over the right neighbours with the right kernel weights. k = 7 = S
    takes every reference, so references with negative cosine similarity enter with the 1e-6 floor."""
    g = torch.Generator().manual_seed(11)
    refs = torch.randn(7, 5, generator=g)
    paths = torch.softmax(2 * torch.randn(7, 3, 4, generator=g), -1)
    query = torch.cat([refs[[1, 4]] + 0.3 * torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)])
    got = kernel_regression(query, refs, paths, k=k, kernel=kernel, bandwidth=bandwidth)
    want = _kernel_regression_loop(query, refs, paths, k, kernel, bandwidth)
    assert got.shape == (5, 3, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if k < 7:  # the comparison can see the neighbour set: one neighbour fewer gives a different answer
        fewer = _kernel_regression_loop(query, refs, paths, k - 1, kernel, bandwidth)
        assert not torch.allclose(got.double(), fewer, atol=1e-3)


def test_kernel_regression_k1_returns_the_neighbour_and_stays_on_the_simplex():
    torch.manual_seed(0)
    refs, paths = torch.randn(7, 5), torch.softmax(torch.randn(7, 3, 4), -1)
    q = refs[[2, 5]] + 0.01 * torch.randn(2, 5)
    torch.testing.assert_close(kernel_regression(q, refs, paths, k=1), paths[[2, 5]])
    for kernel in ("cosine", "gaussian"):
        out = kernel_regression(q, refs, paths, k=3, kernel=kernel)
        assert (out >= 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="kernel"):
        kernel_regression(q, refs, paths, kernel="rbf")
    with pytest.raises(ValueError, match="k must"):
        kernel_regression(q, refs, paths, k=8)


def test_remix_alpha_one_is_identity_and_core_experts_keep_other_entries():
    torch.manual_seed(0)
    w, w_hat = torch.softmax(torch.randn(4, 6), -1), torch.softmax(torch.randn(4, 6), -1)
    assert torch.equal(remix(w, w_hat, alpha=1.0), w)
    out = remix(w, w_hat, alpha=0.0, core_experts=2)
    core = torch.zeros_like(w, dtype=torch.bool).scatter(-1, w_hat.topk(2, -1).indices, True)
    assert torch.equal(out[~core], w[~core])
    torch.testing.assert_close(out.sum(-1), w.sum(-1))


def test_neighbourhood_gd_decreases_the_neighbours_loss(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (1, 8))
    target = torch.tensor([3])
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    omega0 = collect_pathways(model, ids, blocks=blocks)[0]
    params = [p.detach().clone() for p in model.parameters()]
    omega, losses = neighbourhood_gd(model, omega0, ids, target, blocks=blocks, steps=5, lr=0.5)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(omega.sum(-1), torch.ones(len(blocks)))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # model frozen
    assert all(p.requires_grad for p in model.parameters())  # and restored
