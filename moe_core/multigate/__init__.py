"""Dense multi-gate mixtures: MMoE (Ma et al., KDD 2018, DOI 10.1145/3219819.3220007), CGC/PLE (Tang et al.,
RecSys 2020, DOI 10.1145/3383313.3412236) and HoME (Wang et al., arXiv 2408.05430).

In these models every expert sees every row and each task mixes all (or a masked subset of) experts with
its own softmax gate, so experts are evaluated densely: :class:`DenseMLPExperts` keeps the stacked weights
``(E, D_in, D_out)`` of an expert bank and evaluates all experts with one (batched) matmul per layer. (The
routed banks in ``moe_core.experts`` dispatch a sparse ``(indices, weights)`` assignment; with ``indices =
arange(E)`` for every token they compute the same mixture, but the dense path is cheaper for E ~ 10.)

Shapes (glossary in ``moe_core.types``): B batch, D input width, H expert output width, E experts, M tasks.
Routing math (gate softmax) runs in float32 (float64 for float64 inputs); combine weights are cast back to the
activation dtype.

Modules: :mod:`~moe_core.multigate.gates` (softmax gates, :func:`mix`, the all-tasks-at-once
:func:`stacked_gates` / :func:`mix_tasks`, :class:`MultiGateOutput`),
:mod:`~moe_core.multigate.experts` (:class:`DenseMLPExperts`), :mod:`~moe_core.multigate.mmoe` (MMoE,
Shared-Bottom), :mod:`~moe_core.multigate.ple` (CGC, PLE), :mod:`~moe_core.multigate.home` (HoME). Every
public name is importable from ``moe_core.multigate``.
"""

from moe_core.multigate.experts import Activation, DenseMLPExperts, Norm, NormLayers
from moe_core.multigate.gates import (
    MultiGateOutput,
    SoftmaxGate,
    mix,
    mix_tasks,
    routing_float,
    stacked_gates,
    stacked_linear,
)
from moe_core.multigate.home import FeatureGate, HoME
from moe_core.multigate.mmoe import MMoE, SharedBottom
from moe_core.multigate.ple import PLE, CGCLevel

__all__ = [
    "PLE",
    "Activation",
    "CGCLevel",
    "DenseMLPExperts",
    "FeatureGate",
    "HoME",
    "MMoE",
    "MultiGateOutput",
    "Norm",
    "NormLayers",
    "SharedBottom",
    "SoftmaxGate",
    "mix",
    "mix_tasks",
    "routing_float",
    "stacked_gates",
    "stacked_linear",
]
