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

    Logged every ``trainer.log_every_n_steps`` steps, per router module name:
    ``train_routing/<name>/bias_e<i>`` and ``train_routing/<name>/max_over_mean_load`` (1 = balanced).

    Added automatically by :class:`apps.lm.task.LMTask` when the model has a biased router.
    """

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._routers: dict[str, nn.Module] = {}

    def _hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module.training:
                c = output.counts().detach()  # (E,)
                self._counts[name] = self._counts[name] + c if name in self._counts else c

        return hook

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._routers = biased_routers(pl_module)
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
                short = name.removeprefix("model.").replace(".router", "")
                pl_module.log(
                    f"train_routing/{short}/max_over_mean_load",
                    counts.max() / counts.mean().clamp_min(1e-9), on_step=True, on_epoch=False,
                )
                for i, b in enumerate(router.bias.tolist()):
                    pl_module.log(f"train_routing/{short}/bias_e{i}", b, on_step=True, on_epoch=False)
