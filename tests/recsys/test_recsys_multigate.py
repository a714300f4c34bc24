"""Invariants of moe_core.multigate against oracles: dense equivalences with copied weights, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_core.multigate import (
    PLE,
    CGCLevel,
    DenseMLPExperts,
    FeatureGate,
    HoME,
    MMoE,
    SharedBottom,
    SoftmaxGate,
    mix,
)
from moe_core.reference import loop_cgc, loop_mmoe, loop_ple

D, H, B = 12, 8, 16


def _loop_experts(bank: DenseMLPExperts, x: torch.Tensor) -> torch.Tensor:
    """Slow oracle: each expert as a plain sequence of Linear + ReLU, one at a time."""
    outs = []
    for e in range(bank.num_experts):
        h = x
        for w, b in zip(bank.weights, bank.biases):
            h = torch.relu(h @ w[e] + b[e])
        outs.append(h)
    return torch.stack(outs, 1)


def _copy_bank(dst: DenseMLPExperts, srcs: list[DenseMLPExperts]) -> None:
    with torch.no_grad():
        for i in range(len(dst.weights)):
            dst.weights[i].copy_(torch.cat([s.weights[i] for s in srcs if s.num_experts], 0))
            dst.biases[i].copy_(torch.cat([s.biases[i] for s in srcs if s.num_experts], 0))


def test_dense_experts_match_loop_oracle():
    torch.manual_seed(0)
    bank = DenseMLPExperts(num_experts=3, dim=D, hidden_dims=(10, H))
    x = torch.randn(B, D)
    torch.testing.assert_close(bank(x), _loop_experts(bank, x))
    # per-expert inputs: expert e sees x_e
    xe = torch.randn(B, 3, D)
    per = torch.stack([_loop_experts(bank, xe[:, e])[:, e] for e in range(3)], 1)
    torch.testing.assert_close(bank(xe), per)


@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_dense_experts_norm_on_last_layer_only_matches_closed_form(norm, shared_input):
    """``norm_layers="last"`` (HoME's ``Swish(Norm(MLP_E(x)))``): hidden layers ``silu(h W + b)``, no norm;
    output ``silu(norm(h W + b))``; BN in training mode from the batch mean and biased variance of each
    expert unit, written out here one expert at a time; only the output layer owns norm parameters."""
    torch.manual_seed(0)
    e, dims = 3, (10, 9, H)
    bank = DenseMLPExperts(num_experts=e, dim=D, hidden_dims=dims, norm=norm, activation="silu",
                           norm_layers="last").double()  # fmt: skip
    with torch.no_grad():  # affine parameters away from 1/0 so that they are checked
        for p in bank.norms[-1].parameters():
            p.copy_(torch.randn_like(p))
    assert [type(m) for m in bank.norms[:-1]] == [nn.Identity, nn.Identity]
    x = torch.randn(B, D, dtype=torch.float64) if shared_input else torch.randn(B, e, D, dtype=torch.float64)
    w, b = bank.norms[-1].weight, bank.norms[-1].bias
    outs = []
    for k in range(e):
        h = x if shared_input else x[:, k]
        for i in range(len(dims) - 1):
            h = h @ bank.weights[i][k] + bank.biases[i][k]
            h = h * torch.sigmoid(h)
        z = h @ bank.weights[-1][k] + bank.biases[-1][k]  # (B, H)
        if norm == "bn":  # this expert's H units are units k*H .. (k+1)*H-1 of the bank's BatchNorm
            unit = slice(k * H, (k + 1) * H)
            z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5) * w[unit] + b[unit]
        else:
            mu, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
            z = (z - mu) / torch.sqrt(var + 1e-5) * w + b
        outs.append(z * torch.sigmoid(z))
    torch.testing.assert_close(bank(x), torch.stack(outs, 1), rtol=1e-10, atol=1e-10)
    # "all" is a different function on the same weights (the hidden layers are normalised too)
    full = DenseMLPExperts(num_experts=e, dim=D, hidden_dims=dims, norm=norm, activation="silu").double()
    full.load_state_dict(bank.state_dict(), strict=False)
    assert (full(x) - bank(x)).abs().max() > 1e-3


def test_mmoe_matches_formula_and_one_expert_is_shared_bottom():
    torch.manual_seed(0)
    m = MMoE(dim=D, num_tasks=2, num_experts=3, expert_hidden=(H,))
    v = torch.randn(B, D)
    out = m(v)
    ex = _loop_experts(m.experts, v)
    for k in range(2):
        g = torch.softmax(v @ m.gates[k].proj.weight.T + m.gates[k].proj.bias, -1)
        torch.testing.assert_close(out.task_outputs[:, k], (g[:, :, None] * ex).sum(1))
        torch.testing.assert_close(out.gates[f"task{k}"].sum(-1), torch.ones(B))
    m1 = MMoE(dim=D, num_tasks=2, num_experts=1, expert_hidden=(H,))
    sb = SharedBottom(dim=D, num_tasks=2, expert_hidden=(H,))
    _copy_bank(sb.bottom, [m1.experts])
    torch.testing.assert_close(m1(v).task_outputs, sb(v).task_outputs)


def _home_off(**kw) -> HoME:
    args = dict(
        dim=D, categories=[[0], [1]], levels=1, num_shared=2, num_per_category=1, num_per_task=1,
        expert_hidden=(H,), expert_norm="none", activation="relu", hierarchy_mask=False,
        feature_gate_rank=None, self_gate=False,
    )  # fmt: skip
    args.update(kw)
    return HoME(**args)


def test_home_all_switches_off_equals_mmoe_with_copied_weights():
    torch.manual_seed(0)
    home = _home_off()
    n = 2 + 2 * 1 + 2 * 1
    mmoe = MMoE(dim=D, num_tasks=2, num_experts=n, expert_hidden=(H,))
    _copy_bank(mmoe.experts, [home.shared_experts, home.cat_experts, home.task_experts])
    mmoe.gates.load_state_dict(home.task_gates.state_dict())
    v = torch.randn(B, D, requires_grad=True)
    a, b = home(v), mmoe(v)
    torch.testing.assert_close(a.task_outputs, b.task_outputs)
    for k in range(2):
        torch.testing.assert_close(a.gates[f"task{k}"], b.gates[f"task{k}"])
    # gradients w.r.t. the input agree too
    ga = torch.autograd.grad(a.task_outputs.square().sum(), v)[0]
    gb = torch.autograd.grad(b.task_outputs.square().sum(), v)[0]
    torch.testing.assert_close(ga, gb)


def test_home_switches_change_the_function():
    """Each switch must matter (otherwise the equivalence test above would pass vacuously)."""
    torch.manual_seed(0)
    v = torch.randn(B, D)
    base = _home_off()
    ref = base(v).task_outputs
    for kw in ({"hierarchy_mask": True}, {"activation": "silu"}, {"expert_norm": "ln"}):
        other = _home_off(**kw)
        other.load_state_dict(base.state_dict(), strict=False)
        assert not torch.allclose(other(v).task_outputs, ref, atol=1e-5), kw


def test_ple_level_without_specific_experts_is_mmoe_over_shared():
    torch.manual_seed(0)
    level = CGCLevel(dim=D, num_tasks=3, num_shared=4, num_specific=0, expert_hidden=(H,), shared_gate=False)
    mmoe = MMoE(dim=D, num_tasks=3, num_experts=4, expert_hidden=(H,))
    _copy_bank(mmoe.experts, [level.shared])
    mmoe.gates.load_state_dict(level.task_gates.state_dict())
    v = torch.randn(B, D)
    out, _, _ = level(v.unsqueeze(1).expand(-1, 4, -1))
    torch.testing.assert_close(out, mmoe(v).task_outputs)
    ple = PLE(dim=D, num_tasks=3, num_levels=1, num_shared=4, num_specific=0, expert_hidden=(H,))
    ple.levels[0].load_state_dict(level.state_dict())
    torch.testing.assert_close(ple(v).task_outputs, out)


def test_ple_expert_counts_are_independent_and_last_level_has_no_shared_gate():
    ple = PLE(dim=D, num_tasks=2, num_levels=3, num_shared=3, num_specific=1, expert_hidden=(H,))
    for j, level in enumerate(ple.levels):
        assert level.shared.num_experts == 3
        assert level.specific.num_experts == 2 * 1
        assert level.task_gates[0].proj.out_features == 1 + 3
        assert (level.shared_gate is None) == (j == 2)
    out = ple(torch.randn(5, D))
    assert out.task_outputs.shape == (5, 2, H)


def test_ple_level_gate_input_is_previous_task_output():
    torch.manual_seed(0)
    ple = PLE(dim=D, num_tasks=2, num_levels=2, num_shared=2, num_specific=1, expert_hidden=(H,))
    v = torch.randn(B, D)
    first, _, _ = ple.levels[0](v.unsqueeze(1).expand(-1, 3, -1))
    # the gates are evaluated stacked (no per-gate forward call to hook): level 1's task-1 gate weights must
    # be the gate applied to level 0's task-1 output, not to the shared stream or another task's
    proj = ple.levels[1].task_gates[1].proj
    gates = ple(v).gates
    torch.testing.assert_close(gates["task1"], torch.softmax(proj(first[:, 1]), -1))
    assert not torch.allclose(gates["task1"], torch.softmax(proj(first[:, 2]), -1), atol=1e-4)


def test_masked_gate_equals_restricted_softmax_and_blocks_gradient():
    torch.manual_seed(0)
    mask = [True, False, True, False]
    g = SoftmaxGate(dim=D, num_experts=4, mask=mask)
    x = torch.randn(B, D)
    w = g(x)
    logits = g.proj(x)[:, [0, 2]]
    torch.testing.assert_close(w[:, [0, 2]], logits.softmax(-1))
    assert (w[:, [1, 3]] == 0).all()

    # gradient: a masked expert's output and its gate row get exactly zero gradient from the mixture,
    # the allowed ones a non-zero gradient; the same gate without the mask sends gradient to all four
    def grads(gate: SoftmaxGate) -> tuple[torch.Tensor, torch.Tensor]:
        experts = torch.randn(B, 4, H, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out = mix(gate(x), experts)  # (B, H)
        gate.proj.weight.grad = None
        (out * torch.linspace(-1, 1, H)).sum().backward()
        return experts.grad.abs().sum((0, 2)), gate.proj.weight.grad.abs().sum(1)  # (4,) each

    ex_grad, row_grad = grads(g)
    assert (ex_grad[[1, 3]] == 0).all() and (row_grad[[1, 3]] == 0).all()
    assert (ex_grad[[0, 2]] > 0).all() and (row_grad[[0, 2]] > 0).all()
    free = SoftmaxGate(dim=D, num_experts=4)
    free.proj.load_state_dict(g.proj.state_dict())
    ex_grad, row_grad = grads(free)
    assert (ex_grad > 0).all() and (row_grad > 0).all()


@pytest.mark.parametrize("levels", [1, 2])
def test_hierarchy_mask_stops_gradient_to_other_category(levels):
    """Task t's loss sends exactly zero gradient into the task-level experts of other categories and of
    other tasks, and a non-zero one into its own; the same weights without the mask reach every expert."""
    # paper defaults otherwise: BN + Swish, in training mode
    kw = dict(
        dim=D, categories=[[0], [1, 2]], levels=levels, num_shared=1, num_per_category=2, num_per_task=1,
        meta_num_shared=1, meta_num_per_category=1, expert_hidden=(H,), self_gate=True,
    )  # fmt: skip
    torch.manual_seed(0)
    masked = HoME(**kw, hierarchy_mask=True)
    free = HoME(**kw, hierarchy_mask=False)
    free.load_state_dict(masked.state_dict())  # identical weights: only the mask differs
    v = torch.randn(B, D)
    expert_cat = [0, 0, 1, 1]  # category experts, category-major: P=2 per category
    expert_task = [0, 1, 2]  # task experts, task-major: Q=1 per task

    def grads(home: HoME, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """|gradient| of task t's loss per category expert and per task expert (first-layer weights)."""
        home.zero_grad()
        home(v).task_outputs[:, t].sum().backward()
        return (
            home.cat_experts.weights[0].grad.abs().sum((1, 2)),  # (C*P,)
            home.task_experts.weights[0].grad.abs().sum((1, 2)),  # (M*Q,)
        )

    for t, c in [(0, 0), (1, 1), (2, 1)]:
        cat_g, task_g = grads(masked, t)
        for e, ce in enumerate(expert_cat):
            assert (cat_g[e] > 0) if ce == c else (cat_g[e] == 0), (t, e, cat_g)
        for e, te in enumerate(expert_task):
            assert (task_g[e] > 0) if te == t else (task_g[e] == 0), (t, e, task_g)
        # without the mask the very same experts do receive gradient from task t (the test can fail)
        cat_g, task_g = grads(free, t)
        assert (cat_g > 0).all() and (task_g > 0).all(), (t, cat_g, task_g)
    if levels == 2:  # category-0 meta gate puts no weight on category-1's meta expert (shared, cat0, cat1);
        # the global gate (z_shared) mixes all meta experts by design, so meta gradients are not checked
        gates = masked(v).gates
        assert (gates["meta_cat0"][:, 2] == 0).all() and (gates["meta_cat0"][:, 1] > 0).all()


def test_feature_gate_is_identity_at_init_and_trains_B():
    torch.manual_seed(0)
    fg = FeatureGate(dim=D, num_experts=3, rank=2)
    v = torch.randn(B, D)
    out = fg(v)
    torch.testing.assert_close(out, v.unsqueeze(1).expand(-1, 3, -1))
    out.square().sum().backward()
    assert fg.B.grad.abs().sum() > 0


def test_home_rows_independent_in_eval_and_gates_sum_to_one():
    torch.manual_seed(0)
    home = HoME(dim=D, categories=[[0], [1]], levels=2, expert_hidden=(H,), feature_gate_rank=2)
    home.train()
    home(torch.randn(64, D))  # move BN statistics
    home.eval()
    v = torch.randn(B, D)
    full = home(v)
    torch.testing.assert_close(home(v[:3]).task_outputs, full.task_outputs[:3])
    for name, w in full.gates.items():
        if name.startswith(("task", "meta")):
            torch.testing.assert_close(w.sum(-1), torch.ones(B), msg=name)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="norm"):
        DenseMLPExperts(num_experts=2, dim=D, hidden_dims=(H,), norm="batch")
    with pytest.raises(ValueError, match="categories"):
        HoME(dim=D, categories=[[0], [0]], expert_hidden=(H,))
    with pytest.raises(ValueError, match="shape"):
        DenseMLPExperts(num_experts=2, dim=D, hidden_dims=(H,))(torch.randn(D))
    assert isinstance(SoftmaxGate(dim=D, num_experts=2).proj, nn.Linear)


# ---- the stacked (all tasks at once) gates and mixtures against a per-task loop oracle -------------------


def _assert_same_function(model: nn.Module, fast, oracle, v: torch.Tensor) -> None:  # noqa: ANN001
    """Forward outputs and the gradients w.r.t. the input and every parameter agree (float64)."""
    params = [p for p in model.parameters() if p.requires_grad]
    y_fast, y_loop = fast(v), oracle(v)
    torch.testing.assert_close(y_fast, y_loop, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(y_loop)  # a random cotangent: every output element matters
    g_fast = torch.autograd.grad((y_fast * probe).sum(), [v, *params], allow_unused=True)
    g_loop = torch.autograd.grad((y_loop * probe).sum(), [v, *params], allow_unused=True)
    for (name, _), a, b in zip([("input", v), *model.named_parameters()], g_fast, g_loop, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("num_experts,num_tasks", [(3, 2), (5, 4), (1, 3)])
def test_stacked_mmoe_equals_per_task_loop_forward_and_gradients(num_experts, num_tasks):
    torch.manual_seed(0)
    m = MMoE(dim=D, num_tasks=num_tasks, num_experts=num_experts, expert_hidden=(10, H)).double()
    v = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    _assert_same_function(m, lambda x: m(x).task_outputs, lambda x: loop_mmoe(m, x), v)
    out = m(v)
    for k, g in enumerate(m.gates):  # the reported gates are each task's own softmax
        torch.testing.assert_close(out.gates[f"task{k}"], g(v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_specific,num_levels", [(1, 2), (2, 3), (0, 2), (2, 1)])
def test_stacked_ple_equals_per_task_loop_forward_and_gradients(num_specific, num_levels):
    torch.manual_seed(0)
    ple = PLE(
        dim=D, num_tasks=3, num_levels=num_levels, num_shared=2, num_specific=num_specific, expert_hidden=(H,)
    ).double()
    v = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    _assert_same_function(ple, lambda x: ple(x).task_outputs, lambda x: loop_ple(ple, x), v)
    # a middle level fed distinct streams (the same_input shortcut off) against the loop too
    level = ple.levels[0]
    streams = torch.randn(B, 4, D, dtype=torch.float64, requires_grad=True)
    _assert_same_function(level, lambda x: level(x)[0], lambda x: loop_cgc(level, x), streams)


def test_stacked_gates_keep_the_per_gate_state_dict():
    """Checkpoints of the per-task-loop versions load: parameters still live in one SoftmaxGate per task."""
    m = MMoE(dim=D, num_tasks=2, num_experts=3, expert_hidden=(H,))
    assert {k for k in m.state_dict() if k.startswith("gates.")} == {
        f"gates.{k}.proj.{p}" for k in range(2) for p in ("weight", "bias")
    }
    level = CGCLevel(dim=D, num_tasks=2, num_shared=2, num_specific=1, expert_hidden=(H,), shared_gate=True)
    assert {k for k in level.state_dict() if "gate" in k} == {
        f"{g}.proj.{p}" for g in ("task_gates.0", "task_gates.1", "shared_gate") for p in ("weight", "bias")
    }


@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
@pytest.mark.parametrize("shared_input", [True, False])
def test_dense_experts_in_place_relu_gradients_match_finite_differences(norm, shared_input):
    """The bank applies ReLU in place; autograd must still be exact (gradcheck: numerical vs analytic)."""
    torch.manual_seed(0)
    bank = DenseMLPExperts(num_experts=2, dim=4, hidden_dims=(5, 3), norm=norm, activation="relu").double()
    x = torch.randn(6, 4, dtype=torch.float64) if shared_input else torch.randn(6, 2, 4, dtype=torch.float64)
    x.requires_grad_(True)
    params = tuple(bank.parameters())
    assert torch.autograd.gradcheck(lambda x, *_: bank(x), (x, *params), eps=1e-6, atol=1e-5)
    if norm == "none" and shared_input:  # and the forward is still the plain loop's
        torch.testing.assert_close(bank(x), _loop_experts(bank, x))
