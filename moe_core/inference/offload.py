"""Expert offloading with a score-aware cache and CPU/GPU placement after HybriMoE (arXiv 2504.05897;
code PKU-SEC-Lab/HybriMoE ``ktransformers/operators/experts.py``).

From the code [C]: per layer, after routing, ``S_i <- a s_i + (1 - a) S_i`` for the top-p scores
(p = 2 top_k) and ``S_i <- (1 - a) S_i`` otherwise, a = 0.5; on a miss with a full cache the cached expert
with the smallest S is evicted; the next layer's ``prefetch_size`` uncached experts with the highest S are
prefetched. Intra-layer scheduling [P]: each activated expert runs on the GPU (cached), on the CPU, or is
transferred and run on the GPU; a greedy simulation minimises the makespan.
Our reading [D]: the score update uses the mean router probabilities of the step's tokens (the code uses
the first token, identical for one-token decode steps); the compute device is wherever the rest of the
model lives (no device argument); transfers are synchronous copies (no CUDA streams); eviction never
removes an expert the current step needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from moe_core.blocks import (
    RemappedExperts,
    find_moe_blocks,
    router_probs,
    router_top_k,
    router_weight,
    unwrap_bank,
)
from moe_core.validation import check_choice

Weights = dict[str, torch.Tensor]  # one expert's slices of its bank's stacked parameters
Location = Literal["memory", "disk"]
CachePolicy = Literal["score", "lru"]


# --------------------------------------------------------------------------------------------- store
class ExpertStore:
    """Expert weights kept off the compute device: CPU memory or one file per expert on disk.

    Args:
        location: ``memory`` (CPU tensors) or ``disk`` (``torch.save`` files, read on every load).
        directory: folder for ``disk`` (default: a fresh temporary folder, deleted with its files when the
            store is garbage-collected or the interpreter exits; a given folder is left as it is).
    """

    def __init__(
        self, *, location: Location = "memory", directory: str | None = None
    ) -> None:
        self.location = check_choice("location", location, get_args(Location))
        self.directory = directory
        if directory is None and location == "disk":
            self.directory = tempfile.mkdtemp(prefix="moekit_experts_")
            # one file per expert of the whole model: never leave them behind in the temp folder
            weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self._mem: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._bytes: dict[tuple[int, int], int] = {}

    def put(self, layer: int, expert: int, weights: dict[str, torch.Tensor]) -> None:
        """Store one expert's slices of its bank's stacked parameters (``name -> tensor``)."""
        w = {k: t.detach().cpu().clone().contiguous() for k, t in weights.items()}
        self._bytes[(layer, expert)] = sum(t.numel() * t.element_size() for t in w.values())
        if self.location == "memory":
            self._mem[(layer, expert)] = w
        else:
            torch.save(w, os.path.join(self.directory, f"l{layer}_e{expert}.pt"))

    def get(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Load one expert (CPU tensors; a fresh copy, as a transfer would make)."""
        if self.location == "memory":
            return {k: t.clone() for k, t in self._mem[(layer, expert)].items()}
        return torch.load(os.path.join(self.directory, f"l{layer}_e{expert}.pt"), weights_only=True)

    def nbytes(self, layer: int, expert: int) -> int:
        """Size of one expert's weights in bytes."""
        return self._bytes[(layer, expert)]


# --------------------------------------------------------------------------------------------- caches
class LRUExpertCache:
    """Least-recently-used expert cache of one layer (baseline)."""

    def __init__(self, *, capacity: int, num_experts: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity, self.num_experts = capacity, num_experts
        self._order: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, e: int) -> bool:
        return e in self._order

    def cached(self) -> list[int]:
        return list(self._order)

    def observe(self, scores: torch.Tensor, top_k: int) -> None:  # noqa: ARG002 - LRU ignores scores
        """Routing scores of a step (unused by LRU)."""

    def touch(self, e: int) -> None:
        """Record a use of a cached expert."""
        self._order.move_to_end(e)

    def victim(self, protected: set[int]) -> int | None:
        """Expert to evict (least recently used, not protected), or None."""
        for e in self._order:
            if e not in protected:
                return e
        return None

    def admit(self, e: int, protected: set[int]) -> tuple[bool, int | None]:
        """Try to insert ``e``; returns (admitted, evicted expert or None)."""
        if self.capacity == 0:
            return False, None
        evicted = None
        if len(self._order) >= self.capacity:
            evicted = self.victim(protected)
            if evicted is None:
                return False, None
            del self._order[evicted]
        self._order[e] = None
        return True, evicted

    def prefetch_candidates(self, n: int) -> list[int]:  # noqa: ARG002 - LRU has no scores
        return []


class ScoreAwareExpertCache(LRUExpertCache):
    """HybriMoE score-aware cache of one layer: evicts the cached expert with the smallest decayed score.

    Args:
        capacity: experts kept.
        num_experts: E.
        alpha: score update rate (0.5 in the code [C]).
        top_p_factor: the update covers the ``top_p_factor * top_k`` highest scores (2 in the code [C]).
    """

    def __init__(self, *, capacity: int, num_experts: int, alpha: float = 0.5, top_p_factor: int = 2) -> None:
        super().__init__(capacity=capacity, num_experts=num_experts)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha, self.top_p_factor = alpha, top_p_factor
        self.scores = torch.zeros(num_experts)

    def observe(self, scores: torch.Tensor, top_k: int) -> None:
        """Update S from one step's ``(E,)`` routing scores."""
        s = scores.detach().float().cpu()
        p = min(self.top_p_factor * top_k, self.num_experts)
        top = s.topk(p).indices
        new = (1 - self.alpha) * self.scores
        new[top] += self.alpha * s[top]
        self.scores = new

    def victim(self, protected: set[int]) -> int | None:
        """Expert to evict: the cached, not protected expert with the smallest score S (ties: the lowest
        id), or None when every cached expert is protected."""
        cands = [e for e in self._order if e not in protected]
        if not cands:
            return None
        return min(cands, key=lambda e: (float(self.scores[e]), e))

    def prefetch_candidates(self, n: int) -> list[int]:
        """The ``n`` uncached experts with the highest scores."""
        order = torch.argsort(self.scores, descending=True, stable=True).tolist()
        return [e for e in order if e not in self._order and self.scores[e] > 0][:n]


# --------------------------------------------------------------------------------------------- engine
@dataclass
class OffloadStats:
    """Counters of an offloading run (per expert activation of a layer step)."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    bytes_moved: int = 0
    evictions: int = 0
    per_layer_hits: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "prefetched": self.prefetched,
            "prefetch_hits": self.prefetch_hits,
            "bytes_moved": self.bytes_moved,
            "evictions": self.evictions,
        }


class OffloadEngine:
    """Shared state of an offloaded model: the store, one cache per MoE block, and statistics."""

    def __init__(
        self,
        *,
        store: ExpertStore,
        caches: Sequence[LRUExpertCache],
        top_ks: Sequence[int],
        prefetch_size: int = 0,
    ) -> None:
        self.store, self.caches, self.top_ks = store, list(caches), list(top_ks)
        self.prefetch_size = prefetch_size
        self.resident: list[dict[int, Weights]] = [{} for _ in caches]
        self.prefetched_unused: list[set[int]] = [set() for _ in caches]
        self.stats = OffloadStats()

    def _load(self, layer: int, e: int, device: torch.device) -> dict[str, torch.Tensor]:
        self.stats.bytes_moved += self.store.nbytes(layer, e)
        return {k: t.to(device) for k, t in self.store.get(layer, e).items()}

    def _insert(self, layer: int, e: int, w: Weights, protected: set[int]) -> bool:
        ok, evicted = self.caches[layer].admit(e, protected)
        if evicted is not None:
            self.resident[layer].pop(evicted, None)
            self.prefetched_unused[layer].discard(evicted)
            self.stats.evictions += 1
        if ok:
            self.resident[layer][e] = w
        return ok

    def observe(self, layer: int, probs: torch.Tensor, device: torch.device) -> None:
        """After routing of ``layer``: update its scores and prefetch for the next layer."""
        self.caches[layer].observe(probs.mean(0), self.top_ks[layer])
        nxt = layer + 1
        if self.prefetch_size > 0 and nxt < len(self.caches):
            for e in self.caches[nxt].prefetch_candidates(self.prefetch_size):
                if self._insert(nxt, e, self._load(nxt, e, device), protected=set()):
                    self.stats.prefetched += 1
                    self.prefetched_unused[nxt].add(e)

    def fetch(self, layer: int, needed: list[int], device: torch.device) -> dict[int, Weights]:
        """Weights of the experts a step needs; misses load from the store (and are cached if possible)."""
        cache, out, protected = self.caches[layer], {}, set(needed)
        for e in needed:
            if e in cache:
                self.stats.hits += 1
                self.stats.per_layer_hits[layer] = self.stats.per_layer_hits.get(layer, 0) + 1
                if e in self.prefetched_unused[layer]:
                    self.stats.prefetch_hits += 1
                    self.prefetched_unused[layer].discard(e)
                cache.touch(e)
                out[e] = self.resident[layer][e]
            else:
                self.stats.misses += 1
                w = self._load(layer, e, device)
                self._insert(layer, e, w, protected)
                out[e] = w
        return out


class OffloadedExperts(nn.Module):
    """Drop-in expert bank whose weights live in an :class:`ExpertStore` behind a cache.

    The dispatch is the source bank's own code (``torch.func.functional_call`` on a weight-less shell of
    it) on stacked weights in which only the experts the step needs are filled, so outputs are
    bit-identical to the all-in-memory model. Same call convention as moekit and HF banks.
    """

    def __init__(self, *, engine: OffloadEngine, layer: int, shell: nn.Module, specs: dict) -> None:
        super().__init__()
        self.engine, self.layer = engine, layer
        self._shell = [shell]  # a list: not a submodule (its parameters live on the meta device)
        self.specs = specs  # name -> (shape (E, ...), dtype)
        self.num_experts = next(iter(specs.values()))[0][0]

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        used = indices if mask is None else indices[mask]
        needed = torch.unique(used).tolist()
        loaded = self.engine.fetch(self.layer, needed, x.device)
        rows = torch.tensor(needed, dtype=torch.long, device=x.device)
        params = {}
        for name, (shape, dtype) in self.specs.items():
            full = torch.zeros(shape, dtype=dtype, device=x.device)  # (E, ...) zeros for experts not needed
            if needed:
                full.index_copy_(0, rows, torch.stack([loaded[e][name] for e in needed]))
            params[name] = full
        args = (x, indices, weights) if mask is None else (x, indices, weights, mask)
        return torch.func.functional_call(self._shell[0], params, args)


def _stacked_specs(bank: nn.Module) -> dict:
    params = dict(bank.named_parameters(recurse=False))
    if (
        not params
        or any(p.dim() < 2 for p in params.values())
        or len({p.shape[0] for p in params.values()}) != 1
    ):
        raise TypeError(
            f"{type(bank).__name__} cannot be offloaded: it needs stacked (E, ...) parameters only "
            "(offload before compressing or quantising)"
        )
    return {k: (tuple(p.shape), p.dtype) for k, p in params.items()}


def offload_model(
    model: nn.Module,
    *,
    capacity: int | float,
    policy: CachePolicy = "score",
    prefetch_size: int = 0,
    location: Location = "memory",
    directory: str | None = None,
    alpha: float = 0.5,
) -> tuple[OffloadEngine, list]:
    """Move every MoE block's experts into a store and serve them through caches (in place).

    Args:
        capacity: experts cached per layer: an int in ``[1, E]`` or a fraction of E, a float in ``(0, 1]``
            (``round(capacity * E)``, at least 1). Other values raise ``ValueError`` (``TypeError`` for a
            bool or a non-number).
        policy: ``score`` (HybriMoE score-aware) or ``lru``.
        prefetch_size: experts prefetched for the next layer after each routing, an int ``>= 0``; ``> 0``
            needs the ``score`` policy (LRU has no scores to prefetch by).
        location, directory: see :class:`ExpertStore`.

    Null-expert routers (``NullExpertRouter``): the cache scores the E real experts by their columns of
    the ``(N, E + m)`` probabilities; null picks are masked and never load an expert.

    Returns:
        The engine (``engine.stats``) and the router hook handles (call ``.remove()`` to detach).
    """
    check_choice("policy", policy, get_args(CachePolicy))
    if isinstance(capacity, bool) or not isinstance(capacity, int | float):
        raise TypeError(f"capacity must be an int or a float, got {capacity!r}")
    if isinstance(capacity, float) and not 0.0 < capacity <= 1.0:
        raise ValueError(
            f"capacity must be an int count of experts or a float fraction of E in (0, 1], got {capacity}"
        )
    if isinstance(prefetch_size, bool) or not isinstance(prefetch_size, int) or prefetch_size < 0:
        raise ValueError(f"prefetch_size must be an int >= 0, got {prefetch_size!r}")
    if prefetch_size > 0 and policy != "score":
        raise ValueError(
            f"prefetch_size={prefetch_size} needs policy='score' (prefetch follows the scores), got "
            f"policy={policy!r}"
        )
    refs = find_moe_blocks(model)
    if not refs:
        raise ValueError("model has no MoE blocks")
    for layer, ref in enumerate(refs):  # check every layer before the model is touched
        e = next(iter(_stacked_specs(unwrap_bank(ref.experts)).values()))[0][0]
        if isinstance(capacity, int) and not 1 <= capacity <= e:
            raise ValueError(
                f"capacity={capacity} must be in [1, E={e}] (experts of MoE block {layer}, {ref.name!r})"
            )
    store = ExpertStore(location=location, directory=directory)
    caches, top_ks, specs, maps = [], [], [], []
    for layer, ref in enumerate(refs):
        bank = unwrap_bank(ref.experts)
        spec = _stacked_specs(bank)
        e = next(iter(spec.values()))[0][0]
        params = dict(bank.named_parameters(recurse=False))
        for i in range(e):
            store.put(layer, i, {k: p[i] for k, p in params.items()})
        cap = max(1, round(capacity * e)) if isinstance(capacity, float) else capacity
        cls = ScoreAwareExpertCache if policy == "score" else LRUExpertCache
        caches.append(cls(capacity=cap, num_experts=e, **({"alpha": alpha} if policy == "score" else {})))
        top_ks.append(router_top_k(ref.router))
        specs.append(spec)
        maps.append(ref.experts.index_map if isinstance(ref.experts, RemappedExperts) else None)
    engine = OffloadEngine(store=store, caches=caches, top_ks=top_ks, prefetch_size=prefetch_size)
    handles = []
    for layer, ref in enumerate(refs):
        holder = ref.experts if isinstance(ref.experts, RemappedExperts) else ref.block
        bank = unwrap_bank(ref.experts)
        for name, (shape, dtype) in specs[layer].items():  # free the weights: the store holds them now
            setattr(
                bank, name, nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
            )
        holder.experts = OffloadedExperts(engine=engine, layer=layer, shell=bank, specs=specs[layer])

        def hook(_m, _inp, out, layer=layer, router=ref.router, index_map=maps[layer]):
            # (N, E_router): a null-expert router's probs have E + m columns, null experts last; the cache
            # scores the E real experts by their columns
            p = router_probs(router, out)[:, : router_weight(router).shape[0]]
            if index_map is not None:  # merged experts: a stored expert's score is its slots' total
                p = p.new_zeros(p.shape[0], caches[layer].num_experts).index_add_(
                    1, index_map.to(p.device), p
                )
            engine.observe(layer, p, p.device)

        handles.append(ref.router.register_forward_hook(hook))
    return engine, handles


def simulate_cache(
    cache: LRUExpertCache, trace: Sequence[tuple[torch.Tensor, Sequence[int]]], *, top_k: int
) -> float:
    """Hit rate of one layer's cache on a routing trace of ``(scores (E,), needed experts)`` steps."""
    hits = total = 0
    for scores, needed in trace:
        cache.observe(scores, top_k)
        for e in needed:
            total += 1
            if e in cache:
                hits += 1
                cache.touch(e)
            else:
                cache.admit(e, set(needed))
    return hits / max(total, 1)


# --------------------------------------------------------------------------------------------- placement
@dataclass
class Placement:
    """Where each activated expert runs and the simulated layer makespan."""

    assignment: list[str]  # "gpu" (cached), "cpu", or "transfer" (copy then run on GPU)
    makespan: float
    plan: str  # "greedy", "all_cpu" or "all_gpu"


_DEVICES = ("gpu", "cpu", "transfer")


class HybridPlacement:
    """HybriMoE-style intra-layer CPU/GPU scheduling simulator (times in, assignment out).

    Args:
        cpu_time_per_token: CPU seconds per token per expert.
        gpu_time_per_token: GPU seconds per token per expert.
        gpu_launch: fixed GPU seconds per expert.
        transfer_time: seconds to move one expert over PCIe.
    """

    def __init__(
        self,
        *,
        cpu_time_per_token: float,
        gpu_time_per_token: float,
        gpu_launch: float = 0.0,
        transfer_time: float,
    ) -> None:
        self.cpu, self.gpu, self.launch, self.transfer = (
            cpu_time_per_token,
            gpu_time_per_token,
            gpu_launch,
            transfer_time,
        )

    def makespan(self, tokens: Sequence[int], assignment: Sequence[str]) -> float:
        """Simulated finish time: CPU runs its experts back to back; the GPU runs cached experts first,
        transfers are sequential and each transferred expert runs after its copy and the previous work.

        Args:
            tokens: tokens routed to each activated expert.
            assignment: one of ``"gpu"``, ``"cpu"``, ``"transfer"`` per expert (same length as ``tokens``;
                anything else raises ``ValueError``).
        """
        if len(tokens) != len(assignment):
            raise ValueError(f"tokens ({len(tokens)}) and assignment ({len(assignment)}) differ in length")
        for a in assignment:
            if a not in _DEVICES:
                raise ValueError(f"assignment entries must be one of {_DEVICES}, got {a!r}")
        cpu_t = sum(self.cpu * t for t, a in zip(tokens, assignment) if a == "cpu")
        gpu_t = sum(self.launch + self.gpu * t for t, a in zip(tokens, assignment) if a == "gpu")
        link = 0.0
        for t, a in zip(tokens, assignment):
            if a == "transfer":
                link += self.transfer
                gpu_t = max(gpu_t, link) + self.launch + self.gpu * t
        return max(cpu_t, gpu_t)

    def plan(self, tokens: Sequence[int], cached: Sequence[bool]) -> Placement:
        """Greedy placement; falls back to the better trivial plan when that is faster.

        Args:
            tokens: tokens routed to each activated expert.
            cached: whether each expert is already on the GPU.
        """
        if len(tokens) != len(cached):
            raise ValueError(f"tokens ({len(tokens)}) and cached ({len(cached)}) differ in length")
        n = len(tokens)
        assign = ["gpu" if c else "cpu" for c in cached]
        for i in sorted((i for i in range(n) if not cached[i]), key=lambda i: -tokens[i]):
            options = []
            for choice in ("cpu", "transfer"):
                trial = list(assign)
                trial[i] = choice
                options.append((self.makespan(tokens, trial), choice))
            assign[i] = min(options)[1]
        greedy = Placement(assign, self.makespan(tokens, assign), "greedy")
        all_cpu = ["cpu"] * n
        all_gpu = ["gpu" if c else "transfer" for c in cached]
        best = min(
            [
                greedy,
                Placement(all_cpu, self.makespan(tokens, all_cpu), "all_cpu"),
                Placement(all_gpu, self.makespan(tokens, all_gpu), "all_gpu"),
            ],
            key=lambda p: p.makespan,
        )
        return best
