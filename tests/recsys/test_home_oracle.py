"""HoME forward and backward against the loop oracle ``moe_core.reference.home_reference`` (float64).

The oracle rebuilds the paper's equations (as moekit reads them; see the HoME docstring) one row and one
expert at a time and only reads the module's parameters. Every parameter and BatchNorm buffer is set to random
values first, so no mechanism hides behind its initialisation (feature-gate ``B = 0``, BN affine 1/0).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_core.multigate import HoME
from moe_core.reference import home_reference

D, H, B = 7, 5, 6
TOL = dict(rtol=1e-10, atol=1e-10)

BASE = dict(
    categories=[[0], [1]], levels=2, num_shared=2, num_per_category=1, num_per_task=1, meta_num_shared=2,
    meta_num_per_category=1, expert_hidden=(H,), expert_norm="bn", activation="silu", hierarchy_mask=True,
    feature_gate_rank=None, self_gate=True,
)  # fmt: skip

# each switch on/off against the paper's default, task groupings, expert counts, deeper experts
CONFIGS = {
    "paper_default": {},
    "feature_gate": dict(feature_gate_rank=2),
    "no_mask": dict(hierarchy_mask=False),
    "no_self_gate": dict(self_gate=False),
    "no_norm_relu": dict(expert_norm="none", activation="relu"),
    "layer_norm": dict(expert_norm="ln"),
    "three_tasks_two_groups": dict(categories=[[0, 2], [1]], num_per_category=2, meta_num_per_category=2),
    "one_group": dict(categories=[[0, 1, 2]], num_shared=1, meta_num_shared=1),
    "three_groups_softmax_self_gate": dict(
        categories=[[1], [0, 3], [2]], num_per_task=2, num_shared=1, meta_num_shared=1, feature_gate_rank=3
    ),
    "no_shared_no_category_experts": dict(
        categories=[[0, 1], [2]], num_shared=0, num_per_category=0, meta_num_shared=0, meta_num_per_category=2
    ),
    "two_layer_experts_all_on": dict(
        categories=[[0, 1], [2]],
        expert_hidden=(6, H),
        feature_gate_rank=2,
        num_per_task=2,
        expert_norm_layers="all",
    ),
    "levels1": dict(levels=1),
    "levels1_all_on": dict(levels=1, feature_gate_rank=2, categories=[[0, 2], [1]], num_per_task=2),
    "levels1_mmoe_like": dict(
        levels=1, expert_norm="none", activation="relu", hierarchy_mask=False, self_gate=False
    ),
}


def _randomised(seed: int, **kw) -> HoME:
    torch.manual_seed(seed)
    home = HoME(dim=D, **{**BASE, **kw}).double()
    with torch.no_grad():
        for p in home.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
        for name, buf in home.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf))
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    return home


def _compare(home: HoME, v: torch.Tensor) -> None:
    """Outputs, every gate row, and gradients (input and every parameter) equal the oracle's."""
    v = v.clone().requires_grad_(True)
    out = home(v)
    want, want_gates = home_reference(home, v)
    torch.testing.assert_close(out.task_outputs, want, **TOL)
    assert set(want_gates) <= set(out.gates), sorted(set(want_gates) - set(out.gates))
    for name, g in want_gates.items():
        torch.testing.assert_close(out.gates[name], g, **TOL, msg=name)
    proj = torch.randn_like(want)  # a random linear read-out, so every output unit carries gradient
    params = list(home.parameters())
    got = torch.autograd.grad((out.task_outputs * proj).sum(), [v, *params], allow_unused=True)
    ref = torch.autograd.grad((want * proj).sum(), [v, *params], allow_unused=True)
    names = ["v", *(n for n, _ in home.named_parameters())]
    for n, a, b in zip(names, got, ref):
        if a is None or b is None:  # unused by both: the empty banks of a zero expert count
            assert a is None and b is None, n
            continue
        torch.testing.assert_close(a, b, **TOL, msg=n)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_home_forward_and_gradients_equal_loop_oracle(name, mode):
    home = _randomised(0, **CONFIGS[name])
    home.train(mode == "train")  # train: BN batch statistics; eval: the (randomised) running statistics
    torch.manual_seed(1)
    _compare(home, torch.randn(B, D, dtype=torch.float64))


def test_oracle_catches_a_change_in_every_parameter_tensor():
    """The comparison is not vacuous: perturbing any single parameter tensor of the module (while the
    oracle still reads the unperturbed copy) moves the output far outside the tolerance."""
    home = _randomised(0, **CONFIGS["two_layer_experts_all_on"]).eval()
    torch.manual_seed(1)
    v = torch.randn(B, D, dtype=torch.float64)
    want, _ = home_reference(home, v)
    torch.manual_seed(2)
    for name, _ in home.named_parameters():
        other = copy.deepcopy(home)
        with torch.no_grad():  # random, not constant: a constant shift of a gate's logits is a no-op
            p = dict(other.named_parameters())[name]
            p.add_(torch.randn_like(p) * 0.1)
        diff = (other(v).task_outputs - want).abs().max()
        assert diff > 1e-6, name


def test_oracle_follows_the_hierarchy_mask_switch():
    """Same weights, mask off: module and oracle agree again, and differ from the masked output."""
    home = _randomised(0, **CONFIGS["three_tasks_two_groups"]).eval()
    v = torch.randn(B, D, dtype=torch.float64)
    masked, _ = home_reference(home, v)
    free = _randomised(0, **CONFIGS["three_tasks_two_groups"], hierarchy_mask=False).eval()
    free.load_state_dict(home.state_dict())
    unmasked, gates = home_reference(free, v)
    torch.testing.assert_close(free(v).task_outputs, unmasked, **TOL)
    assert (masked - unmasked).abs().max() > 1e-3
    assert (gates["task0"] > 0).all()  # no candidate is masked without the hierarchy mask


@pytest.mark.parametrize("levels", [1, 2])
def test_home_norm_on_expert_output_only_equals_oracle_with_identity_hidden_norms(levels):
    """HoME's default ``expert_norm_layers="last"`` (BN only on each expert's output layer) equals the loop
    oracle run on an ``"all"`` copy whose hidden-layer BatchNorms are exact identities (eval mode, running
    mean 0, variance 1, eps 0, affine 1/0); the two readings differ on the same weights otherwise."""
    kw = dict(categories=[[0, 1], [2]], expert_hidden=(6, 4, H), feature_gate_rank=2, num_per_task=2,
              levels=levels)  # fmt: skip
    last = _randomised(0, **kw, expert_norm_layers="last").eval()
    full = _randomised(0, **kw, expert_norm_layers="all").eval()
    full.load_state_dict(last.state_dict(), strict=False)  # weights, gates, output-layer norms
    with torch.no_grad():
        for mod in full.modules():
            if hasattr(mod, "norms") and mod.norms is not None:
                for bn in list(mod.norms)[:-1]:
                    bn.eps = 0.0
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1.0)
                    bn.weight.fill_(1.0)
                    bn.bias.zero_()
    torch.manual_seed(1)
    v = torch.randn(B, D, dtype=torch.float64)
    want, _ = home_reference(full, v)
    torch.testing.assert_close(last(v).task_outputs, want, **TOL)
    plain = _randomised(0, **kw, expert_norm_layers="all").eval()  # randomised hidden BN statistics
    plain.load_state_dict(last.state_dict(), strict=False)
    assert (plain(v).task_outputs - want).abs().max() > 1e-3
