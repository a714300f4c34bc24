"""Expert banks with stacked weights ``(E, D, H)`` and their dispatch backends.

Gated expert FFNs as in Mixtral (arXiv 2401.04088) and DeepSeekMoE (arXiv 2401.06066); the dispatch layout
(sort pairs by expert, grouped GEMM, combine) follows MegaBlocks (arXiv 2211.15841) and the DeepSeek-V2
``moe_infer`` loop. Backend choice, masking, padding and the gather-only autograd are our design [D];
``docs/moe_core.md`` lists what the kernels require and how the backends ranked on CPU [M].

Every bank computes, for ``x (N, D)``, ``indices (N, K)``, ``weights (N, K)`` and optional ``mask (N, K)``::

    out[t] = sum over used slots k of weights[t, k] * expert_{indices[t, k]}(x[t])

Combine weights multiply expert **outputs** (Mixtral semantics). Masked slots (mask False) cost no FLOPs.
Duplicate expert ids within one token are summed.

Backends (``backend`` argument):

* ``grouped_mm``: one stable sort of the ``N*K`` (token, slot) pairs by expert id, one gather, one
  ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) per projection (for SwiGLU the gate and up
  projections as one GEMM of width 2H on the fused ``gate_up_proj``, its activation and the combine weights
  fused in :class:`_GatedAct`) with device-side int32 group offsets, one gather-sum (``embedding_bag``) back
  to tokens. No host synchronisation. Masked slots get the sentinel id ``E`` so that the sort moves them
  behind the last group; the kernel skips those rows (their outputs are uninitialised and are zeroed with
  ``masked_fill`` before and after). The kernel needs float32/bfloat16/float16 and row strides that are
  multiples of 16 bytes; its backward fails on an expanded (stride-0) upstream gradient, so every grouped
  GEMM output passes through :class:`_ContiguousGrad`.
* ``loop``: the same sort, one ``bincount(...).tolist()`` (a single host sync), the stacked weights
  ``unbind(0)`` once, one dense GEMM per non-empty expert on its contiguous slice, ``index_add_`` back.
  Works for any dtype.
* ``padded``: the same sort, one host sync for the group sizes, every expert's rows gathered into a
  zero-padded ``(E, C, D)`` buffer with ``C`` the largest group (dropless: nothing is cut), one ``bmm`` per
  projection, one gather-sum back. Padding rows are zero and stay zero, so they change no output and no
  gradient; they do cost FLOPs (``E*C/P - 1`` of the useful work). Works for any dtype.
* ``auto``: on accelerators ``grouped_mm`` where it can run (no host sync). On CPU it reads the group sizes
  once; when the buffer holds at most 1.2x the useful rows (balanced routing) and ``grouped_mm`` can run,
  it times both on the first calls of each problem size and keeps the faster (re-timed every thousand
  calls). Problems under ``_TUNE_MIN_MACS``, and all with ``MOEKIT_DISPATCH_TUNING=0``, take ``padded`` only
  when its padding costs fewer multiply-adds than one kernel call per expert (see ``_CALL_MACS``). Balanced
  without ``grouped_mm``: ``padded``; skewed: ``grouped_mm`` where it can run, else ``loop``. "Can run":
  kernel present and working on that device and dtype (checked once by a tiny forward+backward probe),
  weights of the input's dtype, strides aligned.

Requesting ``grouped_mm`` explicitly for tensors it cannot handle raises ``RuntimeError`` (so a test that asks
for it really runs it).

Input checks: ``x`` must have the weights' dtype outside ``torch.autocast`` (``ValueError`` naming both). On
CPU, every backend except an explicit ``grouped_mm`` (which promises no host synchronisation) checks that the
used slots' expert ids lie in ``[0, E)`` and names the first bad token and slot; an id past the last expert
would otherwise read rows no expert computed. :class:`~moe_core.layer.MoELayer` refuses a router whose
``num_experts`` differs from the bank's, on every device.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.validation import check_choice

log = logging.getLogger(__name__)

Backend = Literal["auto", "grouped_mm", "loop", "padded"]
Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}
_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BAG_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # embedding_bag's dtypes
# ``auto`` on CPU pads to the largest group only when routing is nearly balanced (buffer <= 1.2x the useful
# rows): padding buys one batched GEMM per projection, but its wasted rows cost FLOPs. Measured [M] fwd+bwd
# (before the fused activation and embedding_bag combine of the grouped path, which made it 7-9 % faster on
# one thread): fine-grained E=64, k=6, D=512, H=256, T=4096 (waste ~1.1): padded and grouped_mm within 1 %;
# the LM benchmark's top-2 layer (E=8, D=128, H=176, 768 tokens, waste 1.4-1.8 at init): a whole training step
# took 107 ms padded vs 88 ms grouped_mm on 1 thread (72 vs 58 ms on 2 threads; dense model 67 / 53 ms).
_PAD_WASTE = 1.2
# Within that bound, ``auto`` still takes ``grouped_mm`` when the padding rows cost more multiply-adds (per
# projection, ``(E*C - P) * D * H``) than E times this constant, the measured price of one small kernel call
# per expert [M]: 1 thread, bank fwd+bwd, padded / grouped_mm = 0.94 at E=8, D=128, H=176, 768 tokens, k=2
# (padding 0.06 -> 2.1 M MACs, 0.26 M per expert), 1.00 at the coarse and 1.06 at the fine-grained benchmark
# shape (padding 0.08 -> 251 M MACs, 3.9 M per expert).
_CALL_MACS = 1 << 20
# ... but that price is not a constant: each grouped_mm call is one parallel region per expert, and on a
# machine whose cores other processes share, every region waits for a descheduled thread. Measured [M] with
# 2 threads and load ~5 on 2 cores, fine-grained bank fwd+bwd: padded / grouped_mm = 0.48; the same box at
# 1 thread pinned: 1.07-1.09. So when both can run on CPU, ``auto`` times them (see :class:`_Tuner`);
# ``MOEKIT_DISPATCH_TUNING=0`` keeps the static rule above (reproducible backend choice).
_TUNE_TRIALS = 3  # timed forward calls per candidate
# problems below this many multiply-adds per projection (P * D * H) keep the static rule: their forward takes
# well under a millisecond, too little to rank by wall time, and small test problems stay deterministic
_TUNE_MIN_MACS = 1 << 24
_TUNE_EVERY = 1000  # calls between re-measurements (load drifts); each costs ~3 calls of the slower one
_TUNERS: dict[tuple, _Tuner] = {}


def _tuning_enabled() -> bool:
    return os.environ.get("MOEKIT_DISPATCH_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


class _Tuner:
    """Picks the faster of two CPU backends for one problem key from timed forward calls.

    The first ``_TUNE_TRIALS`` calls per candidate alternate between them and are timed (a CPU forward is
    synchronous, so wall time is its cost; the backward repeats the forward's GEMMs and data movement, so it
    ranks the same way); later calls take the candidate with the smaller median, and every
    ``_TUNE_EVERY`` calls the trials start again.
    """

    def __init__(self, candidates: tuple[str, ...]) -> None:
        self.candidates = candidates
        self.times: dict[str, list[float]] = {b: [] for b in candidates}
        self.choice: str | None = None
        self.calls = 0

    def next(self) -> tuple[str, bool]:
        """The backend for this call and whether to time it."""
        self.calls += 1
        if self.choice is not None and self.calls % _TUNE_EVERY == 0:
            self.times = {b: [] for b in self.candidates}
            self.choice = None
        if self.choice is None:
            todo = [b for b in self.candidates if len(self.times[b]) < _TUNE_TRIALS]
            if todo:
                return min(todo, key=lambda b: len(self.times[b])), True
            self.choice = min(self.candidates, key=lambda b: statistics.median(self.times[b]))
            log.info(
                "expert dispatch tuned: %s (median forward %s)",
                self.choice,
                ", ".join(f"{b} {statistics.median(t) * 1e3:.2f} ms" for b, t in self.times.items()),
            )
        return self.choice, False

    def record(self, backend: str, seconds: float) -> None:
        self.times[backend].append(seconds)


def _resolve_activation(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise function of an :data:`Activation` name (``ValueError`` for an unknown name)."""
    return _ACTIVATIONS[check_choice("activation", activation, get_args(Activation))]


# d act(g) / d g times an upstream gradient, written into ``out``, as the aten ops autograd itself runs for
# these activations. They write straight into the strided half of the fused ``(P, 2H)`` gradient (the
# ``.grad_input`` forms) instead of into a new tensor then a copy: silu_backward with the half-view ``g`` and
# a fresh output took 11.8 ms, the ``grad_input=`` form 4.3 ms (24576 x 256, one thread)
_ACT_GRADS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": lambda grad, g, out: torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out),
    "gelu": lambda grad, g, out: torch.ops.aten.gelu_backward.grad_input(
        grad, g, approximate="none", grad_input=out
    ),
    "gelu_tanh": lambda grad, g, out: torch.ops.aten.gelu_backward.grad_input(
        grad, g, approximate="tanh", grad_input=out
    ),
    "relu": lambda grad, g, out: torch.ops.aten.threshold_backward.grad_input(grad, g, 0.0, grad_input=out),
}


class _GatedAct(torch.autograd.Function):
    """``act(g) * u * ws`` from the fused projection ``gu = [g | u] (P, 2H)``; ``ws (P, 1)`` or None.

    Autograd of ``chunk -> act -> mul -> mul`` ends in a ``cat`` of the two halves' gradients (a copy of the
    whole ``(P, 2H)`` gradient) and takes two passes for the scale; this backward writes both halves straight
    into one ``(P, 2H)`` buffer: ``d g = act'(g) * (grad * u * ws)``, ``d u = grad * act(g) * ws``,
    ``d ws = sum_h grad * act(g) * u``.
    """

    @staticmethod
    def forward(ctx, gu, ws, activation):  # noqa: ANN001, ANN205
        hdim = gu.shape[1] // 2
        a = _ACTIVATIONS[activation](gu[:, :hdim])  # (P, H)
        h = a * gu[:, hdim:]  # (P, H)
        if ws is not None:
            h.mul_(ws)
        ctx.save_for_backward(gu, a, ws)
        ctx.activation = activation
        return h

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        gu, a, ws = ctx.saved_tensors
        hdim = gu.shape[1] // 2
        g, u = gu[:, :hdim], gu[:, hdim:]
        out = torch.empty_like(gu)  # (P, 2H): [d g | d u]
        t = grad * u  # (P, H) grad * u
        grad_ws = None
        if ws is not None:
            if ctx.needs_input_grad[1]:
                grad_ws = torch.linalg.vecdot(t, a, dim=1)[:, None]  # (P, 1)
            t.mul_(ws)
            torch.mul(grad, ws, out=out[:, hdim:]).mul_(a)
        else:
            torch.mul(grad, a, out=out[:, hdim:])
        _ACT_GRADS[ctx.activation](t, g, out[:, :hdim])
        return out, grad_ws, None


def _grouped_mm_op() -> Callable[..., torch.Tensor] | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_GMM = _grouped_mm_op()
_PROBED: dict[tuple[str, torch.dtype], bool] = {}
_BACKENDS_SEEN: set[tuple] = set()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm rejects stride-0 grads)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad.contiguous()


class _GatherSum(torch.autograd.Function):
    """``out[i] = sum_j src[fwd[i*kf + j]]``; the backward is again a gather, ``sum_j g[bwd[r*kb + j]]``.

    Valid when ``bwd`` lists, for every source row, the ``kb`` output rows that read it (index ``len(out)``:
    an implicit zero row, used when ``zero_b``; likewise ``len(src)`` in ``fwd`` when ``zero_f``). Dispatch
    and combine are both such row maps, so neither direction needs a scatter-add (``index_add_`` on CPU walks
    rows one by one; ``index_select`` is parallel). With ``off_f`` (``off_b``) that direction is instead
    the bags ``fwd[off_f[i]:off_f[i+1]]`` (``kf``, ``zero_f`` unused): empty bags are zero rows, no zero row
    is appended.
    """

    @staticmethod
    def forward(ctx, src, fwd, kf, zero_f, bwd, kb, zero_b, off_f=None, off_b=None):  # noqa: ANN001, ANN205
        ctx.save_for_backward(bwd, off_b)
        ctx.kb, ctx.zero_b = kb, zero_b
        return _gather_sum(src, fwd, kf, zero_f, off_f)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        bwd, off_b = ctx.saved_tensors
        out = _gather_sum(grad.contiguous(), bwd, ctx.kb, ctx.zero_b, off_b)
        return out, None, None, None, None, None, None, None, None


def _gather_sum(
    src: torch.Tensor, idx: torch.Tensor, k: int, zero_row: bool, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``src[idx]`` summed in groups of ``k``; with ``zero_row``, ``idx == len(src)`` reads zeros; with
    ``offsets`` (float dtypes), row ``i`` sums ``src[idx[offsets[i]:offsets[i+1]]]`` (zeros when empty).

    ``k > 1`` runs as one ``embedding_bag(mode="sum")``: it adds each group's rows straight into the output,
    where ``index_select`` then ``.sum(1)`` writes and rereads a ``(len(idx), D)`` temporary (fine-grained
    combine, 24576 x 512 float32 rows: 1.5 ms instead of 10.8 ms on one core [M]).
    """
    if offsets is not None:
        return F.embedding_bag(idx, src, offsets, mode="sum")  # (len(offsets), D)
    if zero_row:
        src = torch.cat([src, src.new_zeros(1, src.shape[1])])  # (R+1, D)
    if k == 1:
        return src.index_select(0, idx)  # (len(idx), D)
    if src.dtype in _BAG_DTYPES:
        return F.embedding_bag(idx.view(-1, k), src, mode="sum")  # (len(idx)/k, D)
    return src.index_select(0, idx).view(-1, k, src.shape[1]).sum(1)  # (len(idx)/k, D)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``(P, I) x (E, I, O) -> (P, O)``: rows ``[offs[e-1], offs[e])`` use ``b[e]``; later rows undefined."""
    return _ContiguousGrad.apply(_GMM(a, b, offs=offs))  # type: ignore[misc]


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the grouped GEMM kernel runs forward and backward on ``device``/``dtype`` (probed once)."""
    if _GMM is None or dtype not in _GMM_DTYPES:
        return False
    key = (str(device), dtype)
    if key not in _PROBED:
        try:
            # the probe needs autograd: leave inference mode / no_grad for it (a probe run during
            # ``Trainer.validate``/``test`` under ``torch.inference_mode`` used to fail, and its False was
            # cached for the process: evaluation, then training, silently took a slower backend)
            with torch.inference_mode(False), torch.enable_grad():
                a = torch.ones(6, 8, device=device, dtype=dtype, requires_grad=True)
                b = torch.ones(3, 8, 8, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([2, 2, 5], device=device, dtype=torch.int32)
                y = _gmm(a, b, offs)
                y[:5].sum().backward()
                ok = bool(torch.allclose(y[:5].float(), torch.full_like(y[:5].float(), 8.0)))
        except (RuntimeError, NotImplementedError, TypeError) as err:
            log.info("grouped_mm unavailable on %s/%s: %s", device, dtype, err)
            ok = False
        _PROBED[key] = ok
    return _PROBED[key]


def _aligned(t: torch.Tensor) -> bool:
    """Every non-unit stride a multiple of 16 bytes (grouped_mm requirement)."""
    size = t.element_size()
    return all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def _dims_aligned(dtype: torch.dtype, *dims: int) -> bool:
    size = torch.empty((), dtype=dtype).element_size()
    return all((d * size) % 16 == 0 for d in dims)


def _scaled_down(
    h: torch.Tensor,
    down: torch.Tensor,
    ws: torch.Tensor | None,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.bmm,
) -> torch.Tensor:
    """``ws * matmul(h, down)``: batched ``h (E, C, H)``, ``down (E, H, D)``, ``ws (E, C, 1)`` with
    ``torch.bmm``, or sorted rows ``h (P, H)``, ``ws (P, 1)`` with grouped ``matmul``; ``ws`` None: no scale.

    The down projection is linear without bias, so scaling its input rows equals scaling its output rows; we
    scale whichever is narrower (fewer multiplications, same result up to rounding): with H < D (fine-grained
    experts) that halves the elementwise passes over the routed activations in forward and backward.
    """
    if ws is None:
        return matmul(h, down)
    if h.shape[-1] < down.shape[-1]:
        return matmul(h * ws, down)
    return matmul(h, down) * ws


def _check_expert_ids(indices: torch.Tensor, mask: torch.Tensor | None, num_experts: int) -> None:
    """``ValueError`` naming the first used slot whose expert id is outside ``[0, E)``: the sorted layout
    would send it past the last group, into rows no expert computes (uninitialised memory: garbage or NaN
    outputs, no error), or ``bincount`` would refuse a negative id without saying where it came from."""
    bad = (indices < 0) | (indices >= num_experts)  # (N, K)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"indices must be expert ids in [0, {num_experts}) (this bank's num_experts); token {t} slot {k} "
            f"has {int(indices[t, k])} ({int(bad.sum())} such slot(s)): does the router route to as many "
            "experts as the bank holds?"
        )


class _SortedPairs(NamedTuple):
    """The ``N*K`` (token, slot) pairs of one call, sorted by expert id; shared by every backend."""

    flat: torch.Tensor  # (N*K,) expert id of each pair in (token, slot) order; masked pairs hold E
    order: torch.Tensor  # (N*K,) stable sort of ``flat``: pair index at each sorted position
    tok: torch.Tensor  # (N*K,) source token of each sorted pair
    w: torch.Tensor  # (N*K,) combine weight of each pair in (token, slot) order, in the activation dtype
    counts: torch.Tensor  # (E,) used pairs per expert, on device
    k: int  # K, slots per token


def _sort_pairs(
    indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None, num_experts: int
) -> _SortedPairs:
    """One stable sort of the pairs by expert id; masked pairs get the sentinel id E and sort last."""
    k = indices.shape[1]
    flat = indices.reshape(-1)  # (N*K,)
    if mask is not None:
        flat = flat.masked_fill(~mask.reshape(-1), num_experts)  # sentinel id E sorts behind every real group
    order = flat.argsort(stable=True)  # (N*K,)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]  # (E,)
    return _SortedPairs(flat=flat, order=order, tok=order // k, w=weights.reshape(-1), counts=counts, k=k)


class _ExpertBank(nn.Module):
    """Sort/gather/scatter shared by the banks; subclasses provide the per-expert FFN on sorted rows."""

    num_experts: int
    dim: int
    hidden_dim: int
    backend: str

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, backend: str, activation: str) -> None:
        super().__init__()
        if num_experts < 1 or dim < 1 or hidden_dim < 1:
            raise ValueError(
                f"num_experts, dim, hidden_dim must be >= 1, got {num_experts}, {dim}, {hidden_dim}"
            )
        self.backend = check_choice("backend", backend, get_args(Backend))
        self.act = _resolve_activation(activation)
        self.activation = activation
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.last_backend: str | None = None  # the backend the last forward ran (see _note_backend)

    def _weights3d(self) -> tuple[torch.Tensor, ...]:
        """The stacked weight parameters, first ``(E, D, *)``, last the down projection ``(E, H, D)``."""
        raise NotImplementedError

    def _dim_hidden(self) -> tuple[int, int]:
        """``(D, H)`` read from the down projection (banks may be resharded or called with other weights)."""
        h, d = self._weights3d()[-1].shape[1:]
        return d, h

    def _ffn_grouped(self, xs: torch.Tensor, offs: torch.Tensor, ws: torch.Tensor | None) -> torch.Tensor:
        """Sorted rows ``(P, D)``, group ends ``offs (E,)``, row scales ``(P, 1)`` or None -> ``(P, D)``."""
        raise NotImplementedError

    def _ffn_loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _ffn_batched(self, xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        """``(E, C, D)`` rows and ``(E, C, 1)`` combine weights -> weighted expert outputs ``(E, C, D)``."""
        raise NotImplementedError

    def _grouped_mm_ok(self, x: torch.Tensor) -> bool:
        ws = self._weights3d()
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
            # torch's fake-tensor (meta) kernel of grouped_mm accepts bfloat16 only, so a compiled graph
            # cannot trace it in float32/float16 even where the eager kernel runs
            return False
        return (
            x.dtype in _GMM_DTYPES
            and all(w.dtype == x.dtype for w in ws)
            and all(_aligned(w) for w in ws)
            and all(_dims_aligned(x.dtype, w.shape[-2], w.shape[-1]) for w in ws)
            and grouped_mm_works(x.device, x.dtype)
        )

    def _check_grouped_mm(self, x: torch.Tensor) -> None:
        if not self._grouped_mm_ok(x):
            raise RuntimeError(
                f"backend='grouped_mm' cannot run here: needs torch grouped_mm on {x.device} for dtype "
                f"{x.dtype} (float32/bfloat16/float16), weights of the input's dtype, and D, H whose rows "
                f"are multiples of 16 bytes (got D, H = {self._dim_hidden()}); "
                "use backend='auto' or 'loop'"
            )

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mix the selected experts' outputs.

        Args:
            x: ``(N, D)`` tokens.
            indices: ``(N, K)`` int64 expert ids in ``[0, E)``.
            weights: ``(N, K)`` combine weights (cast to ``x.dtype``); they scale expert outputs.
            mask: optional ``(N, K)`` bool; False slots are skipped (no FLOPs, no gradient).

        Returns:
            ``(N, D)`` mixture ``sum_k weights[t, k] * expert_{indices[t, k]}(x[t])`` over used slots.
        """
        # E and D from the weights: banks may be resharded or called functionally with other weights
        w0 = self._weights3d()[0]
        e, d = w0.shape[:2]
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"x must have shape (N, dim={d}), got {tuple(x.shape)}")
        n = x.shape[0]
        if indices.dim() != 2 or indices.shape[0] != n:
            raise ValueError(f"indices must have shape (N={n}, K), got {tuple(indices.shape)}")
        if weights.shape != indices.shape:
            raise ValueError(
                f"weights must have the shape of indices {tuple(indices.shape)}, got {tuple(weights.shape)}"
            )
        if mask is not None and mask.shape != indices.shape:
            raise ValueError(
                f"mask must have the shape of indices {tuple(indices.shape)}, got {tuple(mask.shape)}"
            )
        if n == 0 or indices.shape[1] == 0:
            return self._zeros_connected(x, weights)
        if x.dtype != w0.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"x has dtype {x.dtype} but the expert weights are {w0.dtype}: cast one to the other "
                "(bank.to(dtype) or x.to(dtype)), or run under torch.autocast"
            )
        if indices.device.type == "cpu" and self.backend != "grouped_mm":
            # free on CPU; not on accelerators (it would stall the stream), nor for an explicit grouped_mm,
            # which promises no host synchronisation (MoELayer checks the router's E against the bank's)
            _check_expert_ids(indices, mask, e)
        pairs = _sort_pairs(indices, weights.to(x.dtype), mask, e)
        backend, counts_host = self._select_backend(x, pairs.counts)
        tuner, timed = None, False
        if isinstance(backend, _Tuner):
            tuner = backend
            backend, timed = tuner.next()
        self._note_backend(backend, x)
        t0 = time.perf_counter()
        if backend == "grouped_mm":
            out = self._forward_grouped_mm(x, pairs, masked=mask is not None)
        elif backend == "padded":
            out = self._forward_padded(x, pairs, counts_host)
        else:
            out = self._forward_loop(x, pairs, counts_host)
        if timed and tuner is not None:
            tuner.record(backend, time.perf_counter() - t0)
        return out

    def _note_backend(self, backend: str, x: torch.Tensor) -> None:
        """Record the backend that ran (``last_backend``) and log each new (backend, device, dtype, grad mode)
        once at INFO on ``moe_core.experts``, so that a run can tell which dispatch path it took."""
        key = (backend, x.device.type, x.dtype, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        self.last_backend = backend
        if key not in _BACKENDS_SEEN:
            _BACKENDS_SEEN.add(key)
            log.info(
                "expert dispatch: backend %s (requested %s) on %s/%s, grad %s, inference mode %s",
                backend, self.backend, *key[1:],
            )  # fmt: skip

    def _zeros_connected(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` zeros that keep the graph connected, so every parameter gets a (zero) gradient."""
        params = sum(w.sum() for w in self._weights3d())
        return x.new_zeros(x.shape[0], x.shape[1]) + 0.0 * params + 0.0 * weights.sum()

    def _select_backend(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[str | _Tuner, list[int] | None]:
        """The backend that runs this call (``auto`` resolved; see the module docstring), or the
        :class:`_Tuner` that chooses between two, and, where the choice needed them, the group sizes on the
        host (the single host sync of the CPU paths)."""
        if self.backend == "grouped_mm":
            self._check_grouped_mm(x)
            return "grouped_mm", None
        if self.backend != "auto":
            return self.backend, None
        if x.device.type != "cpu" and self._grouped_mm_ok(x):
            return "grouped_mm", None  # accelerators: no host sync
        counts_host = counts.tolist()
        used, cap = sum(counts_host), max(counts_host)
        if used and len(counts_host) * cap <= _PAD_WASTE * used:
            # balanced: the padding's wasted FLOPs against one kernel call per expert and projection
            w = self._weights3d()[0]
            macs_per_row = math.prod(self._dim_hidden())  # D * H: one projection
            if not self._grouped_mm_ok(x):
                return "padded", counts_host
            if (
                used * macs_per_row >= _TUNE_MIN_MACS
                and _tuning_enabled()
                and not torch.compiler.is_compiling()
            ):
                key = (
                    type(self).__name__, x.dtype, torch.get_num_threads(), torch.is_grad_enabled(),
                    *w.shape, len(counts_host), used.bit_length(),
                )  # fmt: skip
                if key not in _TUNERS:
                    _TUNERS[key] = _Tuner(("grouped_mm", "padded"))
                return _TUNERS[key], counts_host
            pad_macs = (len(counts_host) * cap - used) * macs_per_row
            return ("padded" if pad_macs <= len(counts_host) * _CALL_MACS else "grouped_mm"), counts_host
        return ("grouped_mm" if self._grouped_mm_ok(x) else "loop"), counts_host

    def _forward_grouped_mm(self, x: torch.Tensor, pairs: _SortedPairs, *, masked: bool) -> torch.Tensor:
        """Backend ``grouped_mm``: every sorted pair through one grouped GEMM per projection, no host sync."""
        n, d = x.shape
        k, e = pairs.k, pairs.counts.shape[0]
        order, tok = pairs.order, pairs.tok
        offs = pairs.counts.cumsum(0).to(torch.int32)  # (E,) group end rows
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))  # (N*K,)
        xs = _GatherSum.apply(x, tok, 1, False, inv, k, False)  # (N*K, D) sorted pairs
        ws = pairs.w.index_select(0, order)[:, None]  # (N*K, 1) combine weights of the sorted pairs
        if not masked:
            ys = self._ffn_grouped(xs, offs, ws)  # (N*K, D) weighted expert outputs
        else:
            dead = (pairs.flat.index_select(0, order) == e)[:, None]  # (N*K, 1) masked pairs, sorted last
            xs = xs.masked_fill(dead, 0.0)  # zeroes the kernel's undefined input-gradient rows
            # the kernel leaves rows past offs[-1] (and their input gradients) undefined: zero them before
            # the weights touch them, so that no undefined value reaches a weight's gradient
            ys = self._ffn_grouped(xs, offs, None).masked_fill(dead, 0.0) * ws  # (N*K, D)
        return _GatherSum.apply(ys, inv, k, False, tok, 1, False).to(x.dtype)  # (N, D)

    def _forward_padded(
        self, x: torch.Tensor, pairs: _SortedPairs, counts_host: list[int] | None
    ) -> torch.Tensor:
        """Backend ``padded``: the used pairs gathered into a zero-padded ``(E, C, D)`` buffer, one ``bmm``
        per projection; one host sync for the group sizes (none when ``auto`` already read them)."""
        n, d = x.shape
        k, e = pairs.k, pairs.counts.shape[0]
        if counts_host is None:
            counts_host = pairs.counts.tolist()  # the single host sync
        used, cap = sum(counts_host), max(counts_host)
        if used == 0:
            return self._zeros_connected(x, pairs.w)
        order, tok = pairs.order[:used], pairs.tok[:used]  # (P,) drop masked pairs
        # buffer row of sorted pair j: expert * cap + (j - start of its expert group)
        starts = pairs.counts.cumsum(0) - pairs.counts  # (E,)
        expert_sorted = pairs.flat.index_select(0, order)  # (P,)
        rank = torch.arange(used, device=x.device) - starts.index_select(0, expert_sorted)  # (P,) in group
        slot = expert_sorted * cap + rank  # (P,)
        rows = e * cap
        pair_slot = torch.full((n * k,), rows, dtype=torch.long, device=x.device)  # (N*K,) masked: zero row
        pair_slot.index_copy_(0, order, slot)
        w_pad = pairs.w.new_zeros(rows).index_copy(0, slot, pairs.w.index_select(0, order))  # (E*C,)
        masked = used < n * k
        if x.dtype in _BAG_DTYPES:
            # buffer row e*cap + j as a bag of the sorted pairs: [start_e + j] if j < count_e, else empty
            # (a zero row without appending one to x or to the gradient: no copy of either)
            j = torch.arange(cap, device=x.device)  # (C,)
            off_rows = (starts[:, None] + torch.minimum(j[None, :], pairs.counts[:, None])).reshape(-1)
            xb = _GatherSum.apply(x, tok, 1, False, pair_slot, k, masked, off_rows, None)  # (E*C, D)
        else:  # dispatch: padding rows read the zero row N; backward sums each token's K buffer rows
            row_tok = torch.full((rows,), n, dtype=torch.long, device=x.device)  # (E*C,) padding: row N
            row_tok.index_copy_(0, slot, tok)
            xb = _GatherSum.apply(x, row_tok, 1, True, pair_slot, k, masked)  # (E*C, D)
        yb = self._ffn_batched(xb.view(e, cap, d), w_pad.view(e, cap, 1)).reshape(rows, d)  # (E*C, D)
        # combine: each token sums its K buffer rows; backward hands every buffer row its token's gradient
        if x.dtype in _BAG_DTYPES:
            return _GatherSum.apply(yb, pair_slot, k, masked, tok, 1, False, None, off_rows).to(x.dtype)
        return _GatherSum.apply(yb, pair_slot, k, masked, row_tok, 1, True).to(x.dtype)  # (N, D)

    def _forward_loop(
        self, x: torch.Tensor, pairs: _SortedPairs, counts_host: list[int] | None
    ) -> torch.Tensor:
        """Backend ``loop``: one dense GEMM per non-empty expert on its contiguous slice of the used pairs;
        one host sync for the group sizes (none when ``auto`` already read them). Any dtype."""
        n, d = x.shape
        if counts_host is None:
            counts_host = pairs.counts.tolist()  # the single host sync
        used = sum(counts_host)
        order, tok = pairs.order[:used], pairs.tok[:used]  # (P,) drop masked pairs
        xs = x.index_select(0, tok)  # (P, D)
        ys = self._ffn_loop(xs, counts_host)  # (P, D)
        ys = ys * pairs.w.index_select(0, order)[:, None]  # (P, D) weights scale the expert outputs
        return x.new_zeros(n, d).index_add_(0, tok, ys.to(x.dtype))  # (N, D)


class SwiGLUExperts(_ExpertBank):
    """E SwiGLU experts ``down(act(x @ gate) * (x @ up))`` with stacked weights (Mixtral, DeepSeekMoE).

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: H (per expert).
        backend: dispatch backend (see module docstring).
        activation: gating activation (``silu`` for SwiGLU).

    Weights, in ``x @ W`` layout: the parameter ``gate_up_proj (E, D, 2H)`` holds the gate columns then the
    up columns (``[gate | up]``), ``down_proj (E, H, D)``. ``gate_proj`` and ``up_proj`` ``(E, D, H)`` are
    views of its two halves (read them, or write them in place under ``torch.no_grad()``). Expert ``e``
    equals :class:`moe_core.layer.SwiGLU` with weights ``gate_proj[e]``, ``up_proj[e]``, ``down_proj[e]``.

    One fused parameter, not two, because the grouped and loop backends multiply by ``[gate | up]`` as one
    GEMM of width 2H: with two parameters every step concatenated them (``E*D*2H`` floats, 67 MB at E=64,
    D=512, H=256) and copied the halves of the weight gradient back out [M]. State dicts of the former
    layout (keys ``gate_proj``/``up_proj``) still load; they are fused on the way in.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        backend: Backend = "auto",
        activation: Activation = "silu",
    ) -> None:
        super().__init__(
            num_experts=num_experts, dim=dim, hidden_dim=hidden_dim, backend=backend, activation=activation
        )
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    @property
    def gate_proj(self) -> torch.Tensor:
        """``(E, D, H)`` view of the gate columns of ``gate_up_proj``."""
        return self.gate_up_proj[..., : self.gate_up_proj.shape[-1] // 2]

    @property
    def up_proj(self) -> torch.Tensor:
        """``(E, D, H)`` view of the up columns of ``gate_up_proj``."""
        return self.gate_up_proj[..., self.gate_up_proj.shape[-1] // 2 :]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Fuse a checkpoint of the two-parameter layout (``gate_proj``, ``up_proj`` ``(E, D, H)``) into
        ``gate_up_proj (E, D, 2H)`` first (a method, not a registered hook: pickled modules stay plain)."""
        g, u = prefix + "gate_proj", prefix + "up_proj"
        if g in state_dict and u in state_dict and prefix + "gate_up_proj" not in state_dict:
            state_dict[prefix + "gate_up_proj"] = torch.cat([state_dict.pop(g), state_dict.pop(u)], dim=-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` per projection (the ``nn.Linear`` default bound).

        Gate, up, down drawn in that order, each as one contiguous ``(E, D, H)`` block: the same numbers for a
        given seed as when gate and up were two parameters.
        """
        e, d, h = self.num_experts, self.dim, self.hidden_dim
        with torch.no_grad():
            for view in (self.gate_proj, self.up_proj):
                block = torch.empty(e, d, h, device=view.device, dtype=view.dtype)
                view.copy_(nn.init.uniform_(block, -1 / math.sqrt(d), 1 / math.sqrt(d)))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(h), 1 / math.sqrt(h))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"backend={self.backend!r}, activation={self.activation!r}"
        )

    def _weights3d(self) -> tuple[torch.Tensor, ...]:
        return self.gate_up_proj, self.down_proj

    def _gated(self, gu: torch.Tensor, ws: torch.Tensor | None) -> torch.Tensor:
        """``act(g) * u`` of ``gu = [g | u] (P, 2H)``, scaled by ``ws (P, 1)`` when given -> ``(P, H)``."""
        if self.activation in _ACT_GRADS and self.act is _ACTIVATIONS[self.activation]:
            return _GatedAct.apply(gu, ws, self.activation)  # type: ignore[no-any-return]
        g, u = gu.chunk(2, dim=1)  # (P, H), (P, H)
        h = self.act(g) * u  # (P, H)
        return h if ws is None else h * ws

    def _ffn_grouped(self, xs: torch.Tensor, offs: torch.Tensor, ws: torch.Tensor | None) -> torch.Tensor:
        gu = _gmm(xs, self.gate_up_proj, offs)  # (P, 2H)
        if ws is not None and self.hidden_dim < self.down_proj.shape[-1]:
            # scale the narrower side (see _scaled_down), inside the fused activation
            return _gmm(self._gated(gu, ws), self.down_proj, offs)  # (P, D)
        return _scaled_down(self._gated(gu, None), self.down_proj, ws, partial(_gmm, offs=offs))  # (P, D)

    def _ffn_batched(self, xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        g, u = torch.bmm(xb, self.gate_up_proj).chunk(2, dim=2)  # (E, C, H), (E, C, H)
        return _scaled_down(self.act(g) * u, self.down_proj, wb)  # (E, C, D)

    def _ffn_loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        gate_ups, downs = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)  # unbind once, never W[e]
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                g, u = (xs[start : start + c] @ gate_ups[e]).chunk(2, dim=1)  # (c, H), (c, H)
                outs.append((self.act(g) * u) @ downs[e])  # (c, D)
            start += c
        if not outs:
            return xs.new_zeros(0, xs.shape[1])
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # (P, D)


class MLPExperts(_ExpertBank):
    """E plain two-layer experts ``act(x @ up) @ down`` with stacked weights.

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: H (per expert).
        backend: dispatch backend (see module docstring).
        activation: hidden activation.

    Weights: ``up_proj`` ``(E, D, H)``, ``down_proj`` ``(E, H, D)``.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        backend: Backend = "auto",
        activation: Activation = "gelu",
    ) -> None:
        super().__init__(
            num_experts=num_experts, dim=dim, hidden_dim=hidden_dim, backend=backend, activation=activation
        )
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` per projection."""
        for w, fan_in in ((self.up_proj, self.dim), (self.down_proj, self.hidden_dim)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"backend={self.backend!r}, activation={self.activation!r}"
        )

    def _weights3d(self) -> tuple[torch.Tensor, ...]:
        return self.up_proj, self.down_proj

    def _ffn_grouped(self, xs: torch.Tensor, offs: torch.Tensor, ws: torch.Tensor | None) -> torch.Tensor:
        h = self.act(_gmm(xs, self.up_proj, offs))  # (P, H)
        return _scaled_down(h, self.down_proj, ws, partial(_gmm, offs=offs))  # (P, D)

    def _ffn_batched(self, xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        return _scaled_down(self.act(torch.bmm(xb, self.up_proj)), self.down_proj, wb)  # (E, C, D)

    def _ffn_loop(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ups, downs = self.up_proj.unbind(0), self.down_proj.unbind(0)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                xe = xs[start : start + c]  # (c, D)
                outs.append(self.act(xe @ ups[e]) @ downs[e])  # (c, D)
            start += c
        if not outs:
            return xs.new_zeros(0, xs.shape[1])
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # (P, D)
