#!/usr/bin/env bash
# One prepared GPU check of moekit (issue 17). On a CUDA machine, from the repo root:
#   bash scripts/gpu_check.sh [OUT_DIR]          # ~6 min: dispatch vs reference (fp32, bf16), layer timing,
#                                                # 2-minute bf16 LM run with torch.compile (tokens/s, MFU)
#   bash scripts/gpu_check.sh --dry-run [OUT]    # the same steps at toy size on CPU (a smoke test)
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log; exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [[ "${1:-}" == "--dry-run" ]]; then DRY="--dry-run"; shift; fi
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python
LM_SECONDS="${LM_SECONDS:-120}"
[[ -n "$DRY" ]] && LM_SECONDS="${LM_SECONDS_DRY:-10}"
{
  echo "== moekit gpu check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  if [[ -z "$DRY" ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: run with --dry-run for the CPU smoke test"; exit 2
  fi
  "$PY" scripts/gpu_check.py $DRY --lm-seconds "$LM_SECONDS" --compile --out "$OUT/gpu_check.json"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
