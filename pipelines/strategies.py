"""Lightning strategies for MoE scale-out: DDP for dense parameters, expert parallelism (or sparse
materialisation, Hecate arXiv 2502.02581) for the experts, in one run.

Usage: ``moekit lm fit --config ... --trainer.strategy pipelines.strategies.ExpertParallelStrategy``
(or, in Python, ``Trainer(strategy=ExpertParallelStrategy(mode="sparse"))``).

How it works:

* At ``setup`` for fitting, every ``moe_core.layer.MoELayer`` of the LightningModule is replaced by an
  ``ExpertParallelMoELayer`` (``mode="expert_parallel"``) or ``FSSDPMoELayer`` (``mode="sparse"``) over the
  world group. Checkpoint weights were already restored into the full layers at that point, so a checkpoint
  written at any world size loads at any other.
* The expert-sharded parameters are excluded from DDP (``_ddp_params_and_buffers_to_ignore``): DDP averages
  the dense gradients across ranks, expert gradients stay on their owners. A gradient hook scales expert
  gradients by ``1 / world_size`` so that both follow the same mean-over-ranks convention (training equals
  one process on the concatenated batches).
* ``state_dict()`` of the converted layers gathers the shards (a collective Lightning calls on every rank
  when saving), so saved checkpoints have the single-process keys and shapes.

Limitations: the expert-parallel group is the whole world; optimizer states of the expert shards are saved
per rank-0 shard only, so resuming *optimizer state* needs the same world size (model weights load at any).
"""

from __future__ import annotations

import atexit
import logging
from typing import Any, Literal

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from moe_core.parallel import (
    convert_to_expert_parallel,
    convert_to_fssdp,
    expert_parameter_names,
    scale_expert_grads,
    scale_fssdp_grads,
)
from moe_core.parallel.fssdp import FSSDPMoELayer

log = logging.getLogger(__name__)
_EXIT_HOOK: list[bool] = []


def _destroy_process_group_at_exit() -> None:
    """Join the process groups' communication threads before the interpreter finalises.

    Lightning's spawned workers return without ``destroy_process_group``; gloo groups (the default one and
    the dedicated expert-parallel group) still alive at interpreter exit then intermittently abort the worker
    with "terminate called without an active exception" after training has finished. Measured on
    ``tests/parallel/test_parallel_lightning.py``: 1 failure in 10 runs without this hook, 0 in 20 with it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ExpertParallelStrategy(DDPStrategy):
    """DDP for dense parameters plus expert parallelism / sparse materialisation for MoE experts.

    Args:
        mode: ``expert_parallel`` (experts sharded by id, tokens moved by all-to-all) or ``sparse``
            (experts fully sharded, only selected experts materialised per step).
        rematerialize: with ``mode="sparse"``, re-gather the experts in backward instead of keeping them.
        **kwargs: passed to :class:`lightning.pytorch.strategies.DDPStrategy` (e.g. ``start_method``).
    """

    strategy_name = "expert_parallel"

    def __init__(
        self,
        *,
        mode: Literal["expert_parallel", "sparse"] = "expert_parallel",
        rematerialize: bool = False,
        **kwargs: Any,
    ) -> None:
        if mode not in ("expert_parallel", "sparse"):
            raise ValueError(f"mode must be 'expert_parallel' or 'sparse', got {mode!r}")
        super().__init__(**kwargs)
        self.mode, self.rematerialize = mode, rematerialize
        self.converted: list[str] = []

    def setup(self, trainer) -> None:
        if not _EXIT_HOOK:  # this process joined a process group (setup_environment ran): leave it cleanly
            atexit.register(_destroy_process_group_at_exit)
            _EXIT_HOOK.append(True)
        if trainer.state.fn == TrainerFn.FITTING and not self.converted:
            module = self.model
            world = dist.get_world_size()
            if self.mode == "expert_parallel":
                self.converted = convert_to_expert_parallel(module)
                scale_expert_grads(module, 1.0 / world)
                ignore = expert_parameter_names(module)
            else:
                self.converted = convert_to_fssdp(module, rematerialize=self.rematerialize)
                scale_fssdp_grads(module, 1.0 / world)
                layers = [name for name, m in module.named_modules() if isinstance(m, FSSDPMoELayer)]
                ignore = [f"{name}.expert_shard" for name in layers]
            if not self.converted:
                log.warning("ExpertParallelStrategy: the model has no MoELayer; running plain DDP")
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        super().setup(trainer)
