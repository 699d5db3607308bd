#!/usr/bin/env bash
# The GPU check, for a machine with CUDA, the preinstalled torch/triton and no network:
#   bash benchmarks/gpu_check.sh OUT_DIR
# Runs the Triton tests at full size on CUDA, then a short forward/backward benchmark against
# PyTorch SDPA on concatenated K/V. Everything it writes lands in OUT_DIR. About 6 minutes on an H100.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
timeout 200 python -m pytest -q -p no:cacheprovider --junitxml="$out/junit.xml" \
  tests/test_prefix_attention.py tests/test_gradients.py tests/test_validation.py 2>&1 | tee "$out/pytest.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 150 python benchmarks/bench_attention.py --quick --out "$out" 2>&1 | tee "$out/bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
