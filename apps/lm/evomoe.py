"""EvoMoE schedule (arXiv 2112.14397): expert-diversify, then the dense-to-sparse (DTS) gate.

Phase 1 trains one dense expert (expert 0 of each :class:`apps.lm.model.EvoMoELayer`). At ``switch_step`` the
callback spawns E experts from it with :func:`spawn_experts` and switches the layer to phase 2, where the DTS
router's temperature follows ``TemperatureSchedule``-style annealing from ``max_temperature`` to
``min_temperature`` over ``decay_steps``; from ``hard_step`` steps after the switch the gate is hard (top-k of
the Gumbel scores).

From the paper/repo [C]: Gumbel-softmax gate, activation threshold, linear or exponential temperature decay,
soft then hard phase. Our reading [U/D]: the diversification zeroes a random fraction ``mask_ratio`` of each
spawned expert's weights (a different mask per expert, expert 0 kept intact is NOT assumed: every expert is
masked); the spawning code is not public and the ratio has no claimed default.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import lightning as L
import torch

from apps.lm.model import EvoMoELayer

log = logging.getLogger(__name__)


@torch.no_grad()
def spawn_experts(base: dict[str, torch.Tensor], num_experts: int, mask_ratio: float, seed: int
                  ) -> dict[str, torch.Tensor]:
    """Spawn E diversified copies of one expert.

    Args:
        base: expert weights by name, e.g. ``{"gate_proj": (D, H), "up_proj": (D, H), "down_proj": (H, D)}``.
        num_experts: E.
        mask_ratio: fraction of entries of each copy set to zero, in ``[0, 1)``; 0 gives exact copies.
        seed: seed of the masks (a ``torch.Generator`` on CPU, so results do not depend on the device).

    Returns:
        ``{name: (E, *shape)}`` stacked weights; copy e equals ``base`` on its kept entries and is 0
        elsewhere.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        keep = torch.rand((num_experts, *w.shape), generator=g) >= mask_ratio  # (E, *shape)
        out[name] = w.detach().unsqueeze(0).expand(num_experts, *w.shape) * keep.to(w.device, w.dtype)
    return out


def temperature_at(step: int, *, max_temperature: float, min_temperature: float, decay_steps: int,
                   schedule: Literal["linear", "exp"]) -> float:
    """EvoMoE repo schedule: linear ``max(tmax - u (tmax - tmin) / D, tmin)`` or exponential
    ``max(tmax * exp(u ln(tmin / tmax) / D), tmin)`` for ``u = step`` updates after the switch."""
    u = max(step, 0)
    if schedule == "linear":
        return max(
            max_temperature - u * (max_temperature - min_temperature) / max(decay_steps, 1), min_temperature
        )
    if schedule == "exp":
        return max(
            max_temperature * math.exp(u * math.log(min_temperature / max_temperature) / max(decay_steps, 1)),
            min_temperature,
        )
    raise ValueError(f"schedule must be 'linear' or 'exp', got {schedule!r}")


def evomoe_layers(module: torch.nn.Module) -> list[EvoMoELayer]:
    return [m for m in module.modules() if isinstance(m, EvoMoELayer)]


@torch.no_grad()
def switch_to_sparse(layer: EvoMoELayer, *, mask_ratio: float, seed: int) -> None:
    """Spawn the layer's E experts from expert 0 and enter phase 2."""
    bank = layer.experts
    names = ("gate_proj", "up_proj", "down_proj")
    spawned = spawn_experts(
        {n: getattr(bank, n)[0].clone() for n in names}, bank.num_experts, mask_ratio, seed
    )
    for n in names:
        getattr(bank, n).copy_(spawned[n])
    layer.phase.fill_(2)


class EvoMoECallback(L.Callback):
    """Runs the EvoMoE schedule on every :class:`EvoMoELayer` of the LightningModule.

    Args:
        switch_step: global step at which the dense expert is spawned into E experts.
        mask_ratio: diversification mask ratio of :func:`spawn_experts`.
        seed: base seed of the masks (layer i uses ``seed + i``).
        max_temperature: DTS temperature at the switch.
        min_temperature: final temperature.
        decay_steps: steps from max to min temperature.
        schedule: ``linear`` or ``exp`` decay.
        hard_step: steps after the switch at which the gate turns hard (top-k); None: when the decay ends.
    """

    def __init__(self, *, switch_step: int = 200, mask_ratio: float = 0.5, seed: int = 0,
                 max_temperature: float = 2.0, min_temperature: float = 0.3, decay_steps: int = 500,
                 schedule: Literal["linear", "exp"] = "exp", hard_step: int | None = None) -> None:
        super().__init__()
        if schedule not in ("linear", "exp"):
            raise ValueError(f"schedule must be 'linear' or 'exp', got {schedule!r}")
        self.switch_step, self.mask_ratio, self.seed = switch_step, mask_ratio, seed
        self.max_temperature, self.min_temperature = max_temperature, min_temperature
        self.decay_steps, self.schedule = decay_steps, schedule
        self.hard_step = decay_steps if hard_step is None else hard_step

    def apply(self, module: torch.nn.Module, global_step: int) -> float | None:
        """Bring every EvoMoE layer to the state of ``global_step``; return the temperature (None in phase
        1)."""
        layers = evomoe_layers(module)
        if not layers or global_step < self.switch_step:
            return None
        for i, layer in enumerate(layers):
            if not layer.sparse:
                switch_to_sparse(layer, mask_ratio=self.mask_ratio, seed=self.seed + i)
                log.info("EvoMoE: spawned %d experts at step %d", layer.experts.num_experts, global_step)
        u = global_step - self.switch_step
        tau = temperature_at(u, max_temperature=self.max_temperature, min_temperature=self.min_temperature,
                             decay_steps=self.decay_steps, schedule=self.schedule)
        for layer in layers:
            layer.router.temperature = tau
            layer.router.hard = u >= self.hard_step
        return tau

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        tau = self.apply(pl_module, trainer.global_step)
        if tau is not None:
            pl_module.log("evomoe/temperature", tau, on_step=True, on_epoch=False)
