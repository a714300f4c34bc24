"""Every Literal argument of moe_core is resolved by check_choice: an unknown value raises a ValueError that
names the argument and lists the allowed values; every allowed value is accepted."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

from moe_core import losses, routers
from moe_core.experts import Activation, Backend, MLPExperts, SwiGLUExperts
from moe_core.inference.c3po import Kernel, kernel_regression
from moe_core.inference.offload import CachePolicy, ExpertStore, Location, offload_model
from moe_core.layer import MoELayer
from moe_core.multigate import Activation as DenseActivation
from moe_core.multigate import DenseMLPExperts, HoME, Norm
from moe_core.parallel.simulate import STRATEGIES, CostModel, simulate_step
from moe_core.validation import check_choice


def test_check_choice_returns_the_value_and_names_the_argument():
    assert check_choice("mode", "b", ("a", "b")) == "b"
    assert check_choice("levels", 2, (1, 2)) == 2
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"^levels must be one of \(1, 2\), got 3$"):
        check_choice("levels", 3, iter((1, 2)))  # any iterable of options


def _offload(policy: str) -> None:
    layer = MoELayer(router=routers.TopKRouter(dim=4, num_experts=2, top_k=1),
                     experts=SwiGLUExperts(num_experts=2, dim=4, hidden_dim=4))
    offload_model(nn.Sequential(layer), capacity=1, policy=policy)


def _routing() -> routers.RouterOutput:
    return routers.TopKRouter(dim=4, num_experts=2, top_k=1)(torch.randn(3, 4))


# argument name (/ where, when two share a name) -> (its Literal options, a call that passes the given value)
CASES = {
    "drop_policy": (get_args(routers.DropPolicy),
                    lambda v: routers.TopKRouter(dim=4, num_experts=2, top_k=1, drop_policy=v)),
    "score_func": (get_args(routers.ScoreFunc),
                   lambda v: routers.SigmoidTopKRouter(dim=4, num_experts=2, top_k=1, score_func=v)),
    "kind": (get_args(routers.ScheduleKind), lambda v: routers.TemperatureSchedule(decay_steps=2, kind=v)),
    "backend": (get_args(Backend), lambda v: MLPExperts(num_experts=2, dim=4, hidden_dim=4, backend=v)),
    "activation": (get_args(Activation),
                   lambda v: SwiGLUExperts(num_experts=2, dim=4, hidden_dim=4, activation=v)),
    "level": (get_args(losses.BalanceLevel),
              lambda v: losses.deepseek_balance_loss(_routing(), level=v, num_devices=1)),
    "kernel": (get_args(Kernel),
               lambda v: kernel_regression(torch.randn(1, 3), torch.randn(2, 3), torch.rand(2, 1, 2), k=1,
                                           kernel=v)),
    "location": (get_args(Location), lambda v: ExpertStore(location=v)),
    "policy": (get_args(CachePolicy), _offload),
    "strategy": (STRATEGIES, lambda v: simulate_step(torch.ones(2, 4), v, CostModel())),
    "norm": (get_args(Norm), lambda v: DenseMLPExperts(num_experts=2, dim=4, hidden_dims=(4,), norm=v)),
    "expert_norm": (get_args(Norm), lambda v: HoME(dim=4, categories=[[0], [1]], expert_norm=v)),
    "levels": ((1, 2), lambda v: HoME(dim=4, categories=[[0], [1]], levels=v)),
    "activation/multigate": (get_args(DenseActivation),
                             lambda v: DenseMLPExperts(num_experts=2, dim=4, hidden_dims=(4,), activation=v)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_option_is_accepted_and_an_unknown_one_is_named(case):
    options, call = CASES[case]
    for option in options:
        call(option)
    name = case.split("/")[0]
    with pytest.raises(ValueError, match=rf"^{name} must be one of \(.*\), got "):
        call("no-such-option" if isinstance(options[0], str) else 7)


def test_router_and_bank_must_agree_on_the_number_of_experts():
    """New-user trial: a 16-expert router over an 8-expert bank gave NaN / 1.7e38 for the tokens routed to
    experts 8..15 (the sorted layout sends them past the last group), with no error."""
    bank = SwiGLUExperts(num_experts=8, dim=32, hidden_dim=16)
    with pytest.raises(ValueError, match=r"router routes to num_experts=16 .* bank holds num_experts=8"):
        MoELayer(router=routers.TopKRouter(dim=32, num_experts=16, top_k=2), experts=bank)
    with pytest.raises(TypeError, match=r"router must be an nn.Module .* got str"):
        MoELayer(router="topk", experts=bank)  # type: ignore[arg-type]
    # a null-expert router routes to E true experts (its null slots are masked): it fits an E-bank
    null_router = routers.NullExpertRouter(dim=32, num_experts=8, num_null=2, top_k=2)
    layer = MoELayer(router=null_router, experts=bank)
    assert torch.isfinite(layer(torch.randn(64, 32)).output).all()


@pytest.mark.parametrize("backend", ["auto", "padded", "loop"])
def test_expert_ids_outside_the_bank_are_refused(backend):
    bank = SwiGLUExperts(num_experts=8, dim=32, hidden_dim=16, backend=backend)
    x, w = torch.randn(64, 32), torch.ones(64, 2)
    idx = torch.zeros(64, 2, dtype=torch.long)
    idx[5, 1] = 8  # one id past the last expert
    with pytest.raises(ValueError, match=r"expert ids in \[0, 8\) .* token 5 slot 1 has 8 \(1 such slot"):
        bank(x, idx, w)
    idx[5, 1] = -1
    with pytest.raises(ValueError, match=r"token 5 slot 1 has -1"):
        bank(x, idx, w)
    mask = torch.ones(64, 2, dtype=torch.bool)
    mask[5, 1] = False  # a masked slot's id is never read
    torch.testing.assert_close(bank(x, idx, w, mask), bank(x, idx.clamp(min=0), w, mask))


def test_input_dtype_must_match_the_weights_unless_autocast():
    bank = SwiGLUExperts(num_experts=4, dim=16, hidden_dim=8)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    idx, w = torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1)
    with pytest.raises(ValueError, match=r"x has dtype torch.bfloat16 but the expert weights are torch.fl"):
        bank(x, idx, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bank(x, idx, w).shape == (8, 16)


def test_list_routing_gets_a_hint_in_losses_and_stats():
    from moe_core.stats import routing_stats

    r = routers.TopKRouter(dim=8, num_experts=4, top_k=2)(torch.randn(6, 8))
    for fn in (routing_stats, losses.switch_balance_loss, losses.router_z_loss, losses.deepseek_balance_loss):
        fn(r)  # one RouterOutput: fine
        with pytest.raises(TypeError, match=rf"{fn.__name__}: routing is a list of 2 RouterOutput\(s\)"):
            fn([r, r])


@pytest.mark.parametrize("name", ["MMoE", "SharedBottom", "PLE", "HoME"])
def test_multigate_models_name_a_wrong_input(name):
    """New-user trial: a wrong width failed inside a matmul ('mat1 and mat2 shapes cannot be multiplied'),
    a 3-D input inside the gates' broadcast, and NaN passed through to NaN outputs."""
    from moe_core import multigate

    kw = dict(dim=16, num_tasks=2, expert_hidden=[8])
    model = {
        "MMoE": lambda: multigate.MMoE(num_experts=3, **kw),
        "SharedBottom": lambda: multigate.SharedBottom(**kw),
        "PLE": lambda: multigate.PLE(num_shared=2, num_specific=1, **kw),
        "HoME": lambda: multigate.HoME(dim=16, categories=[[0, 1]], expert_hidden=[8]),
    }[name]()
    assert model(torch.randn(4, 16)).task_outputs.shape[:2] == (4, 2)
    with pytest.raises(ValueError, match=rf"^{name}: v must have shape \(B, dim=16\), got \(4, 17\)$"):
        model(torch.randn(4, 17))
    with pytest.raises(ValueError, match=rf"^{name}: v must have shape \(B, dim=16\), got \(4, 6, 16\)$"):
        model(torch.randn(4, 6, 16))
    bad = torch.randn(4, 16)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"^{name}: v contains non-finite values"):
        model(bad)
