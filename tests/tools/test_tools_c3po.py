"""C3PO: routing override, kernel regression, neighbourhood gradient descent."""

import pytest
import torch

from moe_core.inference.c3po import (
    collect_pathways,
    critical_blocks,
    kernel_regression,
    neighbourhood_gd,
    remix,
    remixed_logits,
)
from moe_core.inference.override import RoutingOverride, last_token_index
from moe_core.surgery.bank import find_moe_blocks


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
