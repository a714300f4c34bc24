"""Training hooks of the LM app.

:class:`RouterBiasUpdate`: DeepSeek-V3's auxiliary-loss-free load balancing (arXiv 2412.19437 section 2.1.2,
arXiv 2408.15664). After every optimizer step each biased router (``moe_core.routers.SigmoidTopKRouter``
with ``use_bias``) moves its selection bias by ``b_i += gamma * sign(mean_j c_j - c_i)`` from the loads ``c``
it saw in that step (summed over micro-batches and data-parallel ranks). ``gamma`` is the router's
``bias_update_speed``, a config value (``router_kwargs.bias_update_speed``; the paper's 1e-3 by default).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from moe_core.stats import load_stats


def biased_routers(module: nn.Module) -> dict[str, nn.Module]:
    """Every sub-module with an aux-loss-free balancing bias (``update_bias`` and a ``bias`` buffer)."""
    return {
        name: m for name, m in module.named_modules()
        if callable(getattr(m, "update_bias", None)) and getattr(m, "bias", None) is not None
    }


class RouterBiasUpdate(L.Callback):
    """Update the aux-loss-free bias of every biased router once per optimizer step.

    Loads are read by a forward hook on each biased router in training mode (so the callback needs nothing
    from the task), accumulated over the micro-batches of one optimizer step, all-reduced (sum) across ranks,
    then passed to ``router.update_bias``. Validation and test forwards (eval mode) are not counted. Under
    activation recomputation a router runs twice per micro-batch; the update only uses the sign of
    ``mean - load``, which doubling every count leaves unchanged.

    Logged every ``trainer.log_every_n_steps`` steps, per router under its routing name (``layer1.ffn``; a
    Chain-of-Experts router shared by all iterations: ``layer1.ffn``): ``routing/train/<name>/bias_e<i>`` and
    ``routing/train/<name>/step_max_over_mean_load``, the ``moe_core.stats.load_stats`` balance (1 =
    balanced) of the loads that moved the bias (the whole optimizer step, all ranks).

    Added automatically by :class:`apps.lm.task.LMTask` when the model has a biased router.
    """

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._routers: dict[str, nn.Module] = {}
        self._log_names: dict[str, str] = {}

    def _hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module.training:
                c = output.counts().detach()  # (E,)
                self._counts[name] = self._counts[name] + c if name in self._counts else c

        return hook

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._routers = biased_routers(pl_module)
        self._log_names = _routing_names(pl_module, self._routers)
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._routers.items()]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._counts = [], {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        accumulate = max(1, trainer.accumulate_grad_batches)
        if (batch_idx + 1) % accumulate and not trainer.is_last_batch:
            return  # mid-accumulation: keep counting until the optimizer steps
        log_now = trainer.log_every_n_steps > 0 and trainer.global_step % trainer.log_every_n_steps == 0
        for name, router in self._routers.items():
            counts = self._counts.pop(name, None)
            if counts is None:
                continue
            counts = trainer.strategy.reduce(counts.float(), reduce_op="sum")  # (E,) over ranks
            router.update_bias(counts)
            if log_now:
                prefix = f"routing/train/{self._log_names[name]}"
                pl_module.log(f"{prefix}/step_max_over_mean_load", load_stats(counts)["max_over_mean_load"],
                              on_step=True, on_epoch=False)
                for i, b in enumerate(router.bias.tolist()):
                    pl_module.log(f"{prefix}/bias_e{i}", b, on_step=True, on_epoch=False)


def _routing_names(pl_module: nn.Module, routers: dict[str, nn.Module]) -> dict[str, str]:
    """Module name -> the routing name the task logs it under (``model.routers_by_name()``: ``layer1.ffn``,
    a shared Chain-of-Experts router without its ``.it<t>``); the module name for a router the model does not
    name."""
    by_module: dict[int, list[str]] = {}
    model = getattr(pl_module, "model", None)
    if callable(getattr(model, "routers_by_name", None)):
        for routing_name, router in model.routers_by_name().items():
            by_module.setdefault(id(router), []).append(routing_name)
    out = {}
    for name, router in routers.items():
        names = by_module.get(id(router), [])
        if len(names) == 1:
            out[name] = names[0]
        elif names:
            out[name] = names[0].rsplit(".it", 1)[0]
        else:
            out[name] = name.removeprefix("model.")
    return out
