#!/usr/bin/env bash
# One-shot GPU check (issue 10): the sample profile on CUDA with bf16 through every stage,
# kill -9 + resume of reasoning_sft and grpo_policy, the feature-extraction benchmark on CUDA,
# and a 2-rank DDP run when two GPUs exist. Prints one JSON summary; under 8 minutes on one
# modern GPU. Fails at once, non-zero with one line, where there is no CUDA.
#   bash benchmarks/gpu_check.sh            (from the repository root; installs nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False with $python); nothing was checked" >&2
  exit 1
fi
export OMP_WAIT_POLICY=PASSIVE
exec "$python" benchmarks/gpu_check.py "$@"
