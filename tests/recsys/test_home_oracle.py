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


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("q", [1, 2])
def test_self_gate_only_specific_mixes_task_experts_only_through_the_self_gate(levels, mask, q):
    """The second self-gate reading, one row and one task at a time: task t's softmax runs over the shared
    and category experts only (its category's with the mask, every category's without), and its own experts
    are added with the self-gate weights; the meta level (levels=2) is read from the module's meta outputs
    and meta gates, which the loop oracle above covers."""
    home = _randomised(
        0, categories=[[0, 2], [1]], levels=levels, num_per_task=q, hierarchy_mask=mask,
        self_gate_only_specific=True,
    ).eval()  # fmt: skip
    torch.manual_seed(1)
    v = torch.randn(B, D, dtype=torch.float64)
    out = home(v)
    ex = torch.cat([out.expert_outputs[k] for k in ("shared", "category", "task")], 1)  # (B, E, H)
    s, p, cats = home.num_shared, home.num_per_category, home.categories
    cat_of = {t: c for c, ts in enumerate(cats) for t in ts}
    n_sc = s + len(cats) * p
    for b in range(B):
        if levels == 2:
            meta = out.expert_outputs["meta"][b]  # (E_meta, H)
            z = [out.gates[f"meta_cat{c}"][b] @ meta for c in range(len(cats))]
            z_sh = out.gates["meta_shared"][b] @ meta
        for t in range(home.num_tasks):
            c = cat_of[t]
            gin = v[b] if levels == 1 else torch.cat([z[c], z_sh])
            cand = list(range(s)) + ([s + c * p + j for j in range(p)] if mask else list(range(s, n_sc)))
            proj = home.task_gates[t].proj
            probs = torch.softmax(torch.stack([proj.weight[k] @ gin + proj.bias[k] for k in cand]), 0)
            h = sum(pk * ex[b, k] for pk, k in zip(probs, cand))
            sin = v[b] if levels == 1 else z[c]
            sg = home.self_gates[t]
            logits = torch.stack([sg.weight[j] @ sin + sg.bias[j] for j in range(q)])
            w = torch.sigmoid(logits) if q == 1 else torch.softmax(logits, 0)
            h = h + sum(w[j] * ex[b, n_sc + t * q + j] for j in range(q))
            torch.testing.assert_close(out.task_outputs[b, t], h, **TOL)
            assert (out.gates[f"task{t}"][b, n_sc:] == 0).all()


def test_self_gate_only_specific_needs_the_self_gate():
    with pytest.raises(ValueError, match="needs self_gate=True"):
        HoME(dim=D, categories=[[0], [1]], self_gate=False, self_gate_only_specific=True)
