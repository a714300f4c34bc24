"""moe_core.runtime: the allocator tuning stops large MoE temporaries from being page-faulted every step.

Oracle: the kernel's minor-page-fault counter (``getrusage``) over identical forward+backward steps of an
expert bank whose routed activations exceed glibc's 32 MiB mmap cap, in a fresh process with and without
the tuning (the setting is process-wide and irreversible, so each case runs in its own interpreter).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from moe_core import runtime

_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from moe_core.runtime import tune_cpu_allocator
    from moe_core.experts import SwiGLUExperts
    applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bank = SwiGLUExperts(num_experts=16, dim=512, hidden_dim=512, backend="padded")
    x = torch.randn(4096, 512, requires_grad=True)
    idx, w = torch.randint(0, 16, (4096, 4)), torch.rand(4096, 4)  # (N*K, D) float32 = 32 MiB
    def step():
        bank(x, idx, w).sum().backward()
    step(); step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        step()
    print(json.dumps({"applied": applied,
                      "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 2}))
    """
)


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and runtime._glibc() is not None


def _faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("MOEKIT_MALLOC_TUNING", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc malloc tuning applies to Linux/glibc only",
)
def test_tuning_removes_most_page_faults_of_large_temporaries() -> None:
    if not _is_glibc():
        pytest.skip("C library is not glibc")
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned["applied"] is True
    # glibc defaults: every >32 MiB temporary is mmapped and faulted afresh (tens of thousands of 4 KiB pages
    # per step); tuned: the freed blocks are reused from the heap
    assert default["faults"] > 5_000, default
    assert tuned["faults"] < 0.3 * default["faults"], (default, tuned)


def test_opt_out_env_and_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEKIT_MALLOC_TUNING", "0")
    assert runtime.tune_cpu_allocator() is False
    with pytest.raises(ValueError, match="trim_threshold_mib"):
        runtime.tune_cpu_allocator(trim_threshold_mib=-1)
