"""Process-level CPU settings that matter for MoE training speed.

Why: MoE layers allocate their routed activations ``(N*K, D)`` (and the expert hidden states) as single
large tensors. glibc's ``malloc`` serves every block above its mmap threshold (dynamic, capped at 32 MiB on
64-bit) with a fresh ``mmap`` and returns it with ``munmap`` on free, so each such tensor is page-faulted and
zeroed by the kernel again on every step. A dense FFN of the same active FLOPs has ``k`` times narrower
temporaries that stay below the cap and are recycled from the heap, so the default allocator taxes MoE
layers and not their dense baselines. Measured with ``benchmarks/moe_layer.py`` (fine-grained E=64, k=6,
D=512, H=256, T=4096, fwd+bwd, 2-core box): moekit 1.84x dense with glibc defaults, 1.33x with the
thresholds raised; the HF ``grouped_mm`` Mixtral block moved from 1.80x to 1.44x. A fixed workload of the
tests (``tests/moe_core/test_runtime.py``) takes ~150,000 minor page faults per step with the defaults and
none once tuned. PyTorch's CPU performance guide gives the same advice in the form "preload jemalloc or
tcmalloc"; :func:`tune_cpu_allocator` is the no-install equivalent.

The setting is process-wide and cannot be undone, so moe_core never applies it on import: the ``moekit``
command line and the benchmarks call :func:`tune_cpu_allocator` (set ``MOEKIT_MALLOC_TUNING=0`` to keep the
glibc defaults); library users call it themselves. Its only cost is memory that stays mapped between steps
(the process's peak, not more) instead of being returned to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MIB = 1 << 20
# some glibc versions refuse a threshold above HEAP_MAX_SIZE / 2 (32 MiB); try 512 MiB first, then fall back
_MMAP_THRESHOLDS_MIB = (512, 32)
_STATE: dict[str, object] = {}


def tune_cpu_allocator(*, trim_threshold_mib: int = 1024, top_pad_mib: int = 64) -> bool:
    """Keep large freed blocks in the heap for reuse instead of returning them to the OS each time.

    Raises glibc's ``M_MMAP_THRESHOLD`` (fixed, no longer dynamic), ``M_TRIM_THRESHOLD`` and ``M_TOP_PAD``
    with ``mallopt``. Idempotent; returns True when the settings are in effect, False where the C library is
    not glibc (macOS, musl, Windows), when ``MOEKIT_MALLOC_TUNING=0``, or when ``mallopt`` refuses.

    Args:
        trim_threshold_mib: free memory at the heap top kept before ``malloc_trim`` gives it back.
        top_pad_mib: extra heap grown per ``sbrk``, so that growing the heap costs fewer system calls.
    """
    if trim_threshold_mib < 0 or top_pad_mib < 0:
        raise ValueError(
            f"trim_threshold_mib and top_pad_mib must be >= 0, got {trim_threshold_mib}, {top_pad_mib}"
        )
    if os.environ.get("MOEKIT_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("MOEKIT_MALLOC_TUNING=0: keeping the C library's allocator defaults")
        return False
    if "applied" in _STATE:
        return bool(_STATE["applied"])
    libc = _glibc()
    ok = False
    if libc is not None:
        for mib in _MMAP_THRESHOLDS_MIB:
            if libc.mallopt(_M_MMAP_THRESHOLD, mib * _MIB) == 1:
                ok = (
                    libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold_mib * _MIB) == 1
                    and libc.mallopt(_M_TOP_PAD, top_pad_mib * _MIB) == 1
                )
                _STATE["mmap_threshold_mib"] = mib
                break
    _STATE["applied"] = ok
    log.info("CPU allocator tuning %s", f"applied ({_STATE})" if ok else "not available")
    return ok


def allocator_state() -> dict[str, object]:
    """What :func:`tune_cpu_allocator` did in this process (empty if it was not called)."""
    return dict(_STATE)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        get_version = libc.gnu_get_libc_version  # absent outside glibc
    except (OSError, AttributeError):
        return None
    get_version.restype = ctypes.c_char_p
    try:
        version = get_version()
    except OSError:
        return None
    if not version:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
