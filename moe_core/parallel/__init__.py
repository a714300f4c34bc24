"""Scale-out for MoE layers: expert parallelism, fully sharded sparse data parallelism, cost simulation.

* :mod:`moe_core.parallel.expert_parallel` — experts sharded over ranks, tokens moved by all-to-all.
* :mod:`moe_core.parallel.fssdp` — Hecate-style sparse all-gather / reduce-scatter of sharded experts.
* :mod:`moe_core.parallel.simulate` — trace-driven cost model (bytes moved, slowest-device load).
* :mod:`moe_core.parallel.mesh` — a (data x expert) 2-D mesh and world-size-independent DCP checkpoints.
"""

from moe_core.parallel.expert_parallel import (
    ExpertParallelMoELayer,
    convert_to_expert_parallel,
    expert_parameter_names,
    scale_expert_grads,
    shard_expert_bank,
)
from moe_core.parallel.fssdp import (
    FSSDPMoELayer,
    PlacementPlan,
    convert_to_fssdp,
    plan_placement,
    scale_fssdp_grads,
    sparse_all_gather,
    sparse_all_gather_reference,
    sparse_reduce_scatter,
    sparse_reduce_scatter_reference,
)
from moe_core.parallel.mesh import (
    MoEMesh,
    init_moe_mesh,
    load_distributed,
    save_distributed,
    sync_grads_2d,
)

__all__ = [
    "ExpertParallelMoELayer",
    "FSSDPMoELayer",
    "MoEMesh",
    "PlacementPlan",
    "convert_to_expert_parallel",
    "convert_to_fssdp",
    "expert_parameter_names",
    "init_moe_mesh",
    "load_distributed",
    "plan_placement",
    "save_distributed",
    "scale_expert_grads",
    "scale_fssdp_grads",
    "shard_expert_bank",
    "sparse_all_gather",
    "sparse_all_gather_reference",
    "sparse_reduce_scatter",
    "sparse_reduce_scatter_reference",
    "sync_grads_2d",
]
