"""Router interception shared by the inference tools (SCMoE rank-k routing, C3PO re-mixing) [D].

Forward hooks on the routers of moekit and HF MoE blocks rewrite the router's top-k selection; the rest
of the model is untouched. Hooks are removed when the context exits (nothing stays registered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from moe_core.blocks import (
    BlockRef,
    find_moe_blocks,
    replace_selection,
    router_probs,
    router_renormalizes,
    router_selection,
    router_top_k,
    select_top_k,
)
from moe_core.routers import (
    DenseToSparseRouter,
    GroupedRouter,
    NullExpertRouter,
    SigmoidTopKRouter,
    TopKRouter,
)

# fn(block_position, ref, probs (N, E), current output) -> (weights (N, K'), indices (N, K')) or None
SelectionFn = Callable[[int, BlockRef, torch.Tensor, object], tuple[torch.Tensor, torch.Tensor] | None]


class RouterHook:
    """Context manager that rewrites the routing selection of chosen MoE blocks.

    Args:
        model: a model with moekit or HF MoE blocks.
        fn: called with ``(position, block, probs (N, E), router_output)``; returns new
            ``(weights, indices)`` or None to keep the router's own choice.
        blocks: positions (in :func:`find_moe_blocks` order, negatives allowed) to hook; default all.
    """

    def __init__(self, model: nn.Module, fn: SelectionFn, *, blocks: Sequence[int] | None = None) -> None:
        self.refs = find_moe_blocks(model)
        if not self.refs:
            raise ValueError("model has no MoE blocks")
        n = len(self.refs)
        pos = range(n) if blocks is None else [b % n if -n <= b < n else _bad(b, n) for b in blocks]
        self.positions = sorted(set(pos))
        self.fn = fn
        self._handles: list = []

    def __enter__(self) -> RouterHook:
        for p in self.positions:
            ref = self.refs[p]

            def hook(_m, _inp, out, p=p, ref=ref):
                new = self.fn(p, ref, router_probs(ref.router, out), out)
                return None if new is None else replace_selection(out, *new)

            self._handles.append(ref.router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _bad(b: int, n: int) -> int:
    raise ValueError(f"block position {b} out of range for {n} MoE blocks")


class RoutingOverride(RouterHook):
    """Replace the pre-top-k routing distribution of chosen tokens in chosen blocks (C3PO library shape).

    The router's own selection is applied to the new distribution, so overriding with the router's own
    probabilities reproduces its output exactly; rows not in ``token_index`` keep the router's own weights
    bit-for-bit. Reproduced: HF Mixtral/Qwen2-MoE/OLMoE routers, ``TopKRouter`` (renormalisation and
    ``routed_scaling_factor``; not with a capacity), ``NoisyTopKRouter``, ``GroupedRouter`` (top-K' per group,
    renormalisation, ``expert_scale``) and ``DenseToSparseRouter`` in eval mode. Refused with ``TypeError``:
    routers without a fixed top-k (``TopPRouter``, ``ExpertChoiceRouter``), ``NullExpertRouter`` (its weights
    are renormalised over the true experts from the logits, which an ``(E + m)`` distribution does not
    reproduce exactly), ``SigmoidTopKRouter`` (per-expert scores that are not a distribution, selection by
    ``scores + bias`` and the group limit), a ``TopKRouter`` with a capacity (dropping depends on every token
    of the batch), a ``DenseToSparseRouter`` in training, and other routers with a scaling factor or expert
    groups.

    Args:
        model: the model.
        omegas: ``{block position: (n, E) distribution}`` for the selected tokens; may require grad (the
            combine weights then carry gradients to it).
        token_index: ``(n,)`` rows of the flattened ``(N, D)`` router input to override (see
            :func:`last_token_index`).
    """

    def __init__(
        self, model: nn.Module, *, omegas: dict[int, torch.Tensor], token_index: torch.Tensor
    ) -> None:
        self.omegas = omegas
        self.token_index = token_index.long()
        super().__init__(model, self._select, blocks=list(omegas))
        self.omegas = {p % len(self.refs): w for p, w in omegas.items()}
        for p in self.positions:
            _check_overridable(p, self.refs[p])

    def _select(self, p: int, ref: BlockRef, probs: torch.Tensor, out):
        omega = self.omegas[p]
        if omega.shape != (self.token_index.numel(), probs.shape[1]):
            raise ValueError(
                f"omega for block {p} must have shape ({self.token_index.numel()}, {probs.shape[1]}), "
                f"got {tuple(omega.shape)}"
            )
        w_old, idx_old = router_selection(out)
        w_new, idx_new = _router_select(p, ref, omega.to(probs.dtype), probs.shape[0])
        w = w_old.to(w_new.dtype).index_put((self.token_index,), w_new)
        idx = idx_old.index_put((self.token_index,), idx_new)
        return w, idx


def _refuse(p: int, ref: BlockRef, why: str) -> TypeError:
    return TypeError(
        f"RoutingOverride does not support {type(ref.router).__name__} (MoE block {p}, {ref.name!r}): {why}"
    )


def _check_overridable(p: int, ref: BlockRef) -> None:
    """Refuse routers whose selection :func:`_router_select` cannot reproduce exactly (``TypeError``)."""
    r = ref.router
    if isinstance(r, NullExpertRouter):
        raise _refuse(
            p, ref, f"null experts (num_null={r.num_null}): its weights are renormalised over the "
            "true experts from the router's logits, which an (E + m) distribution cannot reproduce exactly",
        )
    if isinstance(r, SigmoidTopKRouter):
        raise _refuse(
            p, ref, f"score_func={r.score_func!r} scores are not re-selected as the router does (selection "
            f"by scores + balancing bias, group limit num_groups={r.num_groups}/topk_groups={r.topk_groups}, "
            "log-space renormalisation)",
        )
    known = (TopKRouter, GroupedRouter, DenseToSparseRouter)
    if not isinstance(r, known):
        scale = getattr(r, "routed_scaling_factor", 1.0)
        groups = max(int(getattr(r, a, 1) or 1) for a in ("num_groups", "n_group", "topk_group"))
        if scale != 1.0 or groups > 1:
            raise _refuse(
                p, ref, f"routed_scaling_factor={scale} / expert groups ({groups}) are not reproduced"
            )
    router_top_k(r)  # TypeError for routers without a fixed top-k (top-p, expert choice)


def _router_select(p: int, ref: BlockRef, omega: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's own top-k selection applied to ``omega (n', E)``: ``(weights, indices)`` ``(n', K)``.

    ``n`` is the number of tokens of the forward call (a capacity depends on it).
    """
    r = ref.router
    if isinstance(r, TopKRouter):
        cap = r.capacity(n)
        if cap is not None:
            raise _refuse(
                p, ref, f"a capacity ({cap} slots per expert; capacity_factor={r.capacity_factor}, "
                f"eval_capacity_factor={r.eval_capacity_factor}) drops slots depending on every token of "
                "the batch",
            )
        w, idx = select_top_k(omega, r.top_k, r.renormalize)  # (n', K) as TopKRouter.forward
        if r.routed_scaling_factor != 1.0:
            w = w * r.routed_scaling_factor
        return w, idx
    if isinstance(r, GroupedRouter):
        return r.select(omega)  # (n', K) the router's own per-group selection
    if isinstance(r, DenseToSparseRouter):
        if r.training:
            raise _refuse(p, ref, "in training mode it activates a variable set of experts (use eval mode)")
        return select_top_k(omega, r.top_k, False)  # eval: raw top-k probabilities
    return select_top_k(omega, router_top_k(r), router_renormalizes(r))


def last_token_index(batch: int, seq_len: int) -> torch.Tensor:
    """``(B,)`` rows of the last token of each sequence in a flattened ``(B*T, D)`` router input."""
    return torch.arange(batch) * seq_len + seq_len - 1


def collect_router_probs(
    model: nn.Module, inputs, *, forward: Callable[[nn.Module, object], object] | None = None
) -> list[torch.Tensor]:
    """``(N, E)`` router probabilities of every MoE block for one forward pass (no grad)."""
    refs = find_moe_blocks(model)
    got: list[torch.Tensor | None] = [None] * len(refs)

    def fn(p, ref, probs, out):
        got[p] = probs.detach()
        return None

    with torch.no_grad(), RouterHook(model, fn):
        (forward or (lambda m, x: m(x)))(model, inputs)
    return got  # type: ignore[return-value]
