"""MoE layers: router + routed experts (+ always-on shared experts). DeepSeekMoE: arXiv 2401.06066.

Also: the dense :class:`SwiGLU` FFN and :class:`DenseLayer` (the same FFN behind the layer interface),
:func:`segment_ffn` (DeepSeekMoE fine-grained expert segmentation),
:class:`ChainOfExpertsLayer` (Chain-of-Experts, arXiv 2506.18945) and builders. The optional sigmoid gate on
the shared path follows Qwen2-MoE (HF ``Qwen2MoeSparseMoeBlock``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from moe_core.experts import _ACTIVATIONS, Activation, Backend, SwiGLUExperts, _resolve_activation
from moe_core.routers import TopKRouter
from moe_core.types import MoEOutput, RouterOutput

__all__ = [
    "ChainOfExpertsLayer",
    "DenseLayer",
    "MoELayer",
    "SwiGLU",
    "build_moe_layer",
    "deepseek_moe",
    "segment_ffn",
]


class SwiGLU(nn.Module):
    """Dense gated FFN ``down(act(x @ gate) * (x @ up))``; weights in the layout of one expert of a bank.

    Args:
        dim: D.
        hidden_dim: H.
        activation: gating activation (``silu`` for SwiGLU).

    Weights: ``gate_proj``/``up_proj`` ``(D, H)``, ``down_proj`` ``(H, D)`` (``x @ W`` layout), so that
    ``SwiGLUExperts.gate_proj[e]`` etc. can be copied in and out directly.
    """

    def __init__(self, *, dim: int, hidden_dim: int, activation: Activation = "silu") -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"dim and hidden_dim must be >= 1, got {dim}, {hidden_dim}")
        self.dim, self.hidden_dim, self.activation = dim, hidden_dim, activation
        self.act = _resolve_activation(activation)
        self.gate_proj = nn.Parameter(torch.empty(dim, hidden_dim))
        self.up_proj = nn.Parameter(torch.empty(dim, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` per projection (the ``nn.Linear`` default bound)."""
        for w, fan_in in (
            (self.gate_proj, self.dim),
            (self.up_proj, self.dim),
            (self.down_proj, self.hidden_dim),
        ):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., D) -> (..., D)``."""
        return (self.act(x @ self.gate_proj) * (x @ self.up_proj)) @ self.down_proj


class DenseLayer(SwiGLU):
    """The dense :class:`SwiGLU` FFN behind the MoE-layer interface: ``forward`` returns a :class:`MoEOutput`
    with no routing (``routing=[]``).

    A model whose FFN slot always receives a ``MoEOutput`` takes dense, MoE and Chain-of-Experts layers alike
    (no branching on the layer kind), and ``moe_core.surgery.upcycling.upcycle_model`` can replace this layer
    by an upcycled :class:`MoELayer` (it reads ``gate_proj``/``up_proj``/``down_proj``). Arguments and weights
    as :class:`SwiGLU`.
    """

    def forward(self, x: torch.Tensor) -> MoEOutput:  # type: ignore[override]
        """``x (..., D)`` -> MoEOutput with ``output`` of x's shape and ``routing=[]``."""
        return MoEOutput(output=super().forward(x), routing=[])


def segment_ffn(ffn: SwiGLU, m: int, *, backend: Backend = "auto") -> SwiGLUExperts:
    """Split a dense FFN's hidden dimension into ``m`` fine-grained experts (DeepSeekMoE segmentation [P]).

    Expert ``i`` holds hidden units ``[i*H/m, (i+1)*H/m)``. Because the activation acts element-wise on the
    hidden units and the down projection sums over them, ``sum_i expert_i(x) == ffn(x)`` (up to rounding).

    Args:
        ffn: the dense :class:`SwiGLU`.
        m: number of segments; must divide ``ffn.hidden_dim``.
        backend: dispatch backend of the returned bank.

    Returns:
        A new :class:`SwiGLUExperts` with ``num_experts=m``, ``hidden_dim=H/m`` (weights copied).
    """
    if m < 1 or ffn.hidden_dim % m:
        raise ValueError(f"m must be a positive divisor of hidden_dim={ffn.hidden_dim}, got {m}")
    d, h = ffn.dim, ffn.hidden_dim // m
    bank = SwiGLUExperts(num_experts=m, dim=d, hidden_dim=h, backend=backend, activation=ffn.activation)
    bank = bank.to(dtype=ffn.gate_proj.dtype, device=ffn.gate_proj.device)
    with torch.no_grad():
        bank.gate_proj.copy_(ffn.gate_proj.reshape(d, m, h).transpose(0, 1))  # (D, m*h) -> (m, D, h)
        bank.up_proj.copy_(ffn.up_proj.reshape(d, m, h).transpose(0, 1))  # (m, D, h)
        bank.down_proj.copy_(ffn.down_proj.reshape(m, h, d))  # (m*h, D) -> (m, h, D)
    return bank


def _check_tokens(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Flatten ``(B, T, D)`` or ``(N, D)`` to ``(N, D)``; raise ``ValueError`` naming ``x`` otherwise."""
    if x.dim() not in (2, 3) or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (B, T, dim={dim}) or (N, dim={dim}), got {tuple(x.shape)}")
    return x.reshape(-1, dim)  # (N, D)


class MoELayer(nn.Module):
    """Sparse mixture-of-experts FFN with optional always-on shared experts (DeepSeekMoE, Qwen2-MoE).

    ``y = sum_k w_k E_{i_k}(x) + g(x) * S(x)``, where ``S`` are the shared experts (one fused FFN; DeepSeek
    code fuses its K_s shared experts into one MLP of width K_s*H [C]) and ``g(x) = sigmoid(x @ w_g)`` if
    ``shared_gate`` (Qwen2-MoE) else 1. Combine weights multiply expert outputs. No residual is added here.

    Args:
        router: a moe_core router ``(N, D) -> RouterOutput`` with attribute ``dim``.
        experts: an expert bank ``(x, indices, weights, mask) -> (N, D)``.
        shared_experts: optional module ``(N, D) -> (N, D)`` applied to every token.
        shared_gate: multiply the shared path by ``sigmoid(x @ w)`` (needs ``shared_experts``).
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        if shared_gate and shared_experts is None:
            raise ValueError("shared_gate=True needs shared_experts")
        for name, module in (("router", router), ("experts", experts), ("shared_experts", shared_experts)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(
                    f"MoELayer: {name} must be an nn.Module (e.g. moe_core.routers.TopKRouter(...)), got "
                    f"{type(module).__name__} {module!r:.60}"
                )
        e_router, e_bank = getattr(router, "num_experts", None), getattr(experts, "num_experts", None)
        if isinstance(e_router, int) and isinstance(e_bank, int) and e_router != e_bank:
            # ids the bank does not have would be routed to memory no expert owns (garbage or NaN outputs)
            raise ValueError(
                f"MoELayer: the router routes to num_experts={e_router} experts but the expert bank holds "
                f"num_experts={e_bank}"
            )
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.dim = int(getattr(router, "dim", getattr(experts, "dim", 0)))
        self.shared_gate = nn.Linear(self.dim, 1, bias=False) if shared_gate else None

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """Route, dispatch, combine.

        Args:
            x: ``(B, T, D)`` or ``(N, D)``.

        Returns:
            MoEOutput with ``output`` of the input's shape and the router's decision for the flat tokens.
        """
        flat = _check_tokens(x, self.dim)  # (N, D)
        routing = self.router(flat)
        out = self.experts(flat, routing.indices, routing.weights.to(x.dtype), routing.mask)  # (N, D)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)  # (N, D)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return MoEOutput(output=out.reshape(x.shape), routing=routing)


class ChainOfExpertsLayer(nn.Module):
    """Chain-of-Experts block (arXiv 2506.18945): C sequential routing rounds over one shared expert bank.

    From the CoE code (``ZihanWang314/CoE: modeling_coe.py``) [C]::

        z0 = norm(h)
        z_t = z_{t-1} + MoE_t(z_{t-1})        (inner_residual; else z_t = MoE_t(z_{t-1})),  t = 1..C
        out = h + z_C                          (outer_residual; else out = z_C)

    ``MoE_t`` uses router ``t`` (independent gates) or the single router every round, the same routed experts
    and shared experts (which run every round). CoE defaults: ``inner_residual=True, outer_residual=False``.

    Args:
        routers: C routers (independent gates) or one router reused in every round.
        experts: the routed expert bank shared across rounds.
        num_iterations: C >= 1.
        shared_experts: optional always-on FFN, run every round.
        norm: pre-norm applied to the input ``h`` (``None``: identity, the caller normalises).
        inner_residual: add each round's input back (CoE default True).
        outer_residual: add the un-normalised input ``h`` to the result (CoE default False).
    """

    def __init__(
        self,
        *,
        routers: Sequence[nn.Module],
        experts: nn.Module,
        num_iterations: int,
        shared_experts: nn.Module | None = None,
        norm: nn.Module | None = None,
        inner_residual: bool = True,
        outer_residual: bool = False,
    ) -> None:
        super().__init__()
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if len(routers) not in (1, num_iterations):
            raise ValueError(
                f"routers must hold 1 (shared gate) or num_iterations={num_iterations} routers, "
                f"got {len(routers)}"
            )
        self.routers = nn.ModuleList(routers)
        self.experts, self.shared_experts = experts, shared_experts
        self.norm = norm if norm is not None else nn.Identity()
        self.num_iterations, self.inner_residual, self.outer_residual = (
            num_iterations,
            inner_residual,
            outer_residual,
        )
        self.dim = int(getattr(routers[0], "dim", getattr(experts, "dim", 0)))

    @property
    def independent_gates(self) -> bool:
        """True when every round has its own router."""
        return len(self.routers) == self.num_iterations and self.num_iterations > 1

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """Run the C rounds.

        Args:
            x: ``(B, T, D)`` or ``(N, D)`` block input ``h``.

        Returns:
            MoEOutput with ``output`` of the input's shape and ``routing`` a list of C RouterOutputs.
        """
        h = _check_tokens(x, self.dim)  # (N, D)
        z = self.norm(h)
        routings: list[RouterOutput] = []
        for t in range(self.num_iterations):
            router = self.routers[t if len(self.routers) > 1 else 0]
            routing = router(z)
            y = self.experts(z, routing.indices, routing.weights.to(z.dtype), routing.mask)  # (N, D)
            if self.shared_experts is not None:
                y = y + self.shared_experts(z)
            z = z + y if self.inner_residual else y
            routings.append(routing)
        out = h + z if self.outer_residual else z
        return MoEOutput(output=out.reshape(x.shape), routing=routings)


def build_moe_layer(
    *,
    dim: int,
    hidden_dim: int,
    num_experts: int,
    top_k: int,
    num_shared_experts: int = 0,
    renormalize: bool | None = None,
    shared_gate: bool = False,
    backend: Backend = "auto",
    activation: Activation = "silu",
) -> MoELayer:
    """Top-k softmax MoE layer with SwiGLU experts and optional fused shared experts.

    Args:
        dim: D.
        hidden_dim: H per routed expert; shared experts are one SwiGLU of width ``num_shared_experts * H``.
        num_experts: routed experts E.
        top_k: K.
        num_shared_experts: K_s always-on experts (0: none).
        renormalize: renormalise the top-k probabilities (Mixtral) or not (DeepSeekMoE, Qwen2-MoE); None:
            renormalise iff ``top_k > 1`` (see ``TopKRouter``).
        shared_gate: sigmoid gate on the shared path (Qwen2-MoE).
        backend: dispatch backend of the routed bank.
        activation: expert gating activation.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
    router = TopKRouter(dim=dim, num_experts=num_experts, top_k=top_k, renormalize=renormalize)
    experts = SwiGLUExperts(
        num_experts=num_experts, dim=dim, hidden_dim=hidden_dim, backend=backend, activation=activation
    )
    shared = (
        SwiGLU(dim=dim, hidden_dim=num_shared_experts * hidden_dim, activation=activation)
        if num_shared_experts
        else None
    )
    return MoELayer(router=router, experts=experts, shared_experts=shared, shared_gate=shared_gate)


def deepseek_moe(
    *,
    dim: int,
    hidden_dim: int,
    num_experts: int,
    top_k: int,
    num_shared_experts: int = 1,
    backend: Backend = "auto",
) -> MoELayer:
    """DeepSeekMoE layer [P]: fine-grained routed experts, K_s shared experts, no top-k renormalisation.

    For the paper's 2B model: ``num_experts=63, top_k=7, num_shared_experts=1, hidden_dim=FFN/4``; 16B:
    ``64, 6, 2`` (arXiv 2401.06066 section 4).
    """
    return build_moe_layer(
        dim=dim,
        hidden_dim=hidden_dim,
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=num_shared_experts,
        renormalize=False,
        backend=backend,
    )
