#!/usr/bin/env bash
# The GPU check, for a machine with CUDA, the preinstalled torch/triton/transformers/peft and no network:
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. the tests on CUDA (Triton kernels at full size, the transformers drop-in against PEFT);
# 2. the kernel benchmark (--quick) against SDPA on concatenated K/V, PEFT-style attention and the floor;
# 3. the end-to-end benchmark on a SmolLM2-135M-shaped model (training step vs PEFT, decode).
# Everything it writes lands in OUT_DIR. About 6-7 minutes on an H100/H200 (cold Triton cache).
# GPU_CHECK_TESTS overrides the pytest selection (e.g. to rerun only what failed).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tests=${GPU_CHECK_TESTS:-"tests/test_prefix_attention.py tests/test_gradients.py tests/test_validation.py tests/test_hf_models.py tests/test_hf_generate.py tests/test_hf_training.py tests/test_hf_checkpoint.py"}
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python -c "import peft; print('peft', peft.__version__)" || echo "peft missing: the PEFT comparisons skip"
  git rev-parse HEAD 2>/dev/null
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"
# shellcheck disable=SC2086
timeout "${GPU_CHECK_TEST_SECONDS:-240}" python -m pytest -q -p no:cacheprovider --junitxml="$out/junit.xml" $tests \
  2>&1 | tail -c 200000 > "$out/pytest.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
grep -E "passed|failed|error" "$out/pytest.txt" | tail -3
timeout 110 python benchmarks/bench_attention.py --quick --out "$out" > "$out/bench.txt" 2>&1 || status=1
tail -n 3 "$out/bench.txt"
timeout 150 python benchmarks/bench_hf.py --out "$out" > "$out/bench_hf.txt" 2>&1 || status=1
grep -E "^\{|wrote|Error" "$out/bench_hf.txt" | tail -n 8
exit $status
