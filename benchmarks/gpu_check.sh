#!/usr/bin/env bash
# The GPU check, for a machine with CUDA, the preinstalled torch/triton/transformers/peft and no network:
#   bash benchmarks/gpu_check.sh OUT_DIR
# Parts, in this order, each under its own `timeout` (a part that fails or runs out of time is recorded
# and the next one runs):
#   tests   the tests on CUDA (Triton kernels at full size, the transformers drop-in against PEFT)
#   quick   prefix-kernels bench --preset quick (2 training shapes: fwd/bwd/fwd+bwd, 1 decode shape):
#           ours, PEFT-style, cat+SDPA, flash-attn (rows "skipped" when not importable), the floor
#   decode  prefix-kernels bench --preset decode (5 KV-cache shapes), the same providers
#   shared  prefix-kernels bench --preset shared-prefix (64 rows sharing a 4096/8192-token prefix, 64-token
#           caches): the Triton decode cascade against its per-row path, the prefix copied per row, cat+SDPA
#   flex    FlexAttention (torch.compile; every shape and grad mode compiles) against ours on one
#           training shape (fwd, fwd+bwd) and one decode shape
#   window  prefix-kernels bench --preset window (N = M = 8192, sliding windows W = 1024 and W = M), fwd
#           and fwd+bwd: ours, PEFT-style and cat+SDPA (window in the explicit mask), FlexAttention (window
#           in the mask_mod), the floor (masked SDPA); flash-attn rows "skipped" (its window hides the prefix)
#   encoders benchmarks/bench_encoders.py: a training step of a BART-base-shaped model (ours with PEFT's
#           placement and with the paper's, against PEFT SEQ_2_SEQ_LM) and of a BERT-base-shaped classifier
#           (ours against a concatenating SDPA baseline): median ms, peak memory
#   cartridge benchmarks/bench_cartridge.py: a training step at P = 1024/4096/8192 against PEFT CARTRIDGE, and
#           greedy generate() of 64 rows sharing a P = 1024/4096 cartridge: ours, the prefix copied into every
#           row's DynamicCache, PEFT's own generate(): tokens/s, peak memory
#   hf      benchmarks/bench_hf.py: a SmolLM2-135M-shaped model, training step vs PEFT, greedy decode
# Limits (seconds; a part gets the smaller of its cap and what is left of the total budget, and is
# skipped when less than its minimum is left):
#   part     cap   min  expected on an H100, cold Triton cache (estimates, not yet measured)
#   tests    150    60  100-150 (GPU_CHECK_TEST_SECONDS)
#   quick     75    30  40-60
#   decode    60    30  30-45
#   shared    45    20  15-30
#   flex      90    45  60-90 (five Inductor compiles)
#   window   120    60  70-110 (six Inductor compiles of FlexAttention; each finished shape's line is in the log)
#   encoders  60    20  15-30 (two models built on the GPU, 7 steps per provider; not yet measured)
#   cartridge 90    30  30-60 (3 training P, 2 decode P x 3 impls x 4 generate() calls, Triton decode compiles)
#   hf       150    60  90-120 (prints rows as it goes, so a cut-off run still leaves numbers)
# Total budget GPU_CHECK_SECONDS (default 360, environment.txt included): with a cold cache hf may not fit and is
# recorded as skipped; GPU_CHECK_PARTS=hf runs it alone.
# Everything lands in OUT_DIR: environment.txt, parts.tsv (part, status, seconds, limit), pytest.txt +
# junit.xml, attention_{quick,decode,shared,flex,window}_<device>.json/.csv/.png + bench_*.txt logs,
# encoders_<device>.json/.csv + bench_encoders.txt, cartridge_<device>.json/.csv + cartridge_decode_<device>.json/.csv
# + bench_cartridge.txt, hf_<device>.json/.csv + bench_hf.txt. Exit status 0 when every part that ran passed, 1 when one failed or timed out, 2
# without CUDA.
# Overrides: GPU_CHECK_TESTS (the pytest selection, e.g. to rerun only what failed),
# GPU_CHECK_TEST_SECONDS (the tests' cap), GPU_CHECK_SECONDS (the total budget), GPU_CHECK_PARTS (a
# space-separated subset of "tests quick decode shared flex window encoders cartridge hf tune"; tune, the block-size sweep of
# benchmarks/tune_blocks.py (model vs measured), runs only when named), GPU_CHECK_DRY_RUN=1 (print what would run
# and its limit, run nothing), GPU_CHECK_FORCE=1 (run without CUDA too: tests this script on a CPU box),
# GPU_CHECK_HF_ARGS (extra bench_hf.py arguments, e.g. "--compile reduce-overhead" to time compiled steps
# with CUDA graphs; not the default: it adds Inductor compiles of the 30-layer model, ours and PEFT, forward
# and backward, per training shape, which do not fit the hf cap), GPU_CHECK_HF_SECONDS (the hf part's cap, 150;
# e.g. GPU_CHECK_PARTS=hf GPU_CHECK_HF_SECONDS=600 GPU_CHECK_SECONDS=660 GPU_CHECK_HF_ARGS="--compile reduce-overhead").
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tests=${GPU_CHECK_TESTS:-"tests/test_prefix_attention.py tests/test_gradients.py tests/test_backward.py tests/test_features.py tests/test_host_overhead.py tests/test_validation.py tests/test_hf_models.py tests/test_hf_generate.py tests/test_hf_training.py tests/test_hf_checkpoint.py tests/test_torch_compile.py tests/test_decode_kernel.py tests/test_decode_cascade.py tests/test_hf_features.py tests/test_hf_seq2seq.py"}
budget=${GPU_CHECK_SECONDS:-360}
parts=" ${GPU_CHECK_PARTS:-tests quick decode shared flex window encoders cartridge hf} "
dry=${GPU_CHECK_DRY_RUN:-0}
providers=ours,peft_style,cat_sdpa,sdpa_no_prefix,flash_attn
status=0
start=$SECONDS

{
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
  timeout 60 python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  timeout 60 python -c "import peft; print('peft', peft.__version__)" || echo "peft missing: the PEFT comparisons skip"
  timeout 60 python -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null \
    || echo "flash_attn not importable: its rows are 'skipped'"
  echo "git $(git rev-parse HEAD 2>/dev/null || echo '(no checkout)')"
  echo "budget ${budget}s, parts:${parts% }"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

cuda=$(timeout 60 python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$cuda" != 1 ] && [ "${GPU_CHECK_FORCE:-0}" != 1 ] && [ "$dry" != 1 ]; then
  echo "gpu_check.sh: CUDA is not available (torch.cuda.is_available() is False): nothing to check." >&2
  echo "  On a CPU box: GPU_CHECK_DRY_RUN=1 prints what would run; GPU_CHECK_FORCE=1 runs it on the CPU." >&2
  printf 'part\tstatus\tseconds\tlimit_s\nall\tskipped (no CUDA)\t0\t0\n' > "$out/parts.tsv"
  exit 2
fi

printf 'part\tstatus\tseconds\tlimit_s\n' > "$out/parts.tsv"
record() {  # part, status, seconds, limit
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$out/parts.tsv"
  echo "== $1: $2 (${3}s, limit ${4}s; $((SECONDS - start))s of ${budget}s used)"
}

# run_part NAME CAP MIN LOG CMD...: CMD (stdout and stderr to LOG) under timeout min(CAP, budget left)
run_part() {
  local name=$1 cap=$2 need=$3 log=$4 rc t0 left limit
  shift 4
  if [[ $parts != *" $name "* ]]; then
    return
  fi
  rm -f "$log"  # not a previous run's
  left=$((budget - (SECONDS - start)))
  limit=$((cap < left ? cap : left))
  if ((limit < need)); then
    record "$name" "skipped (${left}s of the budget left, needs ${need}s)" 0 "$cap"
    return
  fi
  if [ "$dry" = 1 ]; then
    echo "would run (timeout ${limit}s, log $log): $*"
    record "$name" "dry-run" 0 "$limit"
    return
  fi
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) record "$name" ok $((SECONDS - t0)) "$limit" ;;
    124 | 137) status=1; record "$name" "timeout" $((SECONDS - t0)) "$limit" ;;
    *) status=1; record "$name" "failed (exit $rc)" $((SECONDS - t0)) "$limit" ;;
  esac
  return 0
}

bench() {  # NAME CAP MIN ARGS...: prefix-kernels bench writing attention_NAME_<device>.json/.csv/.png into OUT
  local name=$1 cap=$2 need=$3
  shift 3
  run_part "$name" "$cap" "$need" "$out/bench_$name.txt" \
    python -m prefix_kernels bench --out "$out" --flat --name "attention_$name" "$@"
  [ -s "$out/bench_$name.txt" ] && grep -E "^(training|decode) |ERROR|wrote|Error" "$out/bench_$name.txt" | tail -n 12
  return 0
}

# shellcheck disable=SC2086
run_part tests "${GPU_CHECK_TEST_SECONDS:-150}" 60 "$out/pytest_full.txt" \
  python -m pytest -q -p no:cacheprovider --junitxml="$out/junit.xml" $tests
if [ -f "$out/pytest_full.txt" ]; then
  tail -c 200000 "$out/pytest_full.txt" > "$out/pytest.txt" && rm -f "$out/pytest_full.txt"
  grep -E "passed|failed|error" "$out/pytest.txt" | tail -3
fi
bench quick 75 30 --preset quick --providers "$providers"
bench decode 60 30 --preset decode --providers "$providers"
bench shared 45 20 --preset shared-prefix --providers "ours,ours_no_cascade,ours_prefix_in_cache,cat_sdpa"
bench flex 90 45 --shape 8x16x4x1024x1024x64x128 --shape 64x32x8x1x4096x64x128 \
  --providers ours,flex_attention --modes fwd,fwd+bwd,decode
bench window 120 60 --preset window --providers "$providers,flex_attention" --modes fwd,fwd+bwd
if [ "$cuda" = 1 ]; then
  encoders_args=(--device cuda)
  cartridge_args=(--device cuda --dtype bfloat16 --decode-reps 3)
else  # GPU_CHECK_FORCE=1 on a CPU box: tiny shapes, so that the parts finish
  encoders_args=(--device cpu --quick)
  cartridge_args=(--device cpu --layers 1 --hidden 64 --prefix-lengths 64 --batch 2 --tokens 16 --reps 1
                  --decode-prefix-lengths 64 --decode-rows 4 --prompt 4 --new-tokens 4 --decode-reps 1)
fi
run_part encoders 60 20 "$out/bench_encoders.txt" python benchmarks/bench_encoders.py --out "$out" "${encoders_args[@]}"
[ -s "$out/bench_encoders.txt" ] && grep -E "^(bart|bert) |wrote|Error" "$out/bench_encoders.txt" | tail -n 8
run_part cartridge 90 30 "$out/bench_cartridge.txt" python benchmarks/bench_cartridge.py --out "$out" "${cartridge_args[@]}"
[ -s "$out/bench_cartridge.txt" ] && grep -E "^P=|^decode |wrote|Error" "$out/bench_cartridge.txt" | tail -n 12
# shellcheck disable=SC2086  # GPU_CHECK_HF_ARGS is a list of arguments
run_part hf "${GPU_CHECK_HF_SECONDS:-150}" 60 "$out/bench_hf.txt" python benchmarks/bench_hf.py --out "$out" ${GPU_CHECK_HF_ARGS:-}
[ -s "$out/bench_hf.txt" ] && grep -E "^\{|wrote|Error" "$out/bench_hf.txt" | tail -n 8

# Not in the default parts: GPU_CHECK_PARTS="tests tune" (or "tune") sweeps the kernels' block sizes.
# It times the candidates the static model favours (tune_blocks.FAVOURED) and prints model and measured
# side by side; the model rows come from benchmarks/results/blocks_model.json (made on a CPU box with
# `tune_blocks.py --model-only --out benchmarks/results`) when present, else from sm_90 compiles here.
tune_args=(--out "$out")
[ -f benchmarks/results/blocks_model.json ] && tune_args+=(--model-from benchmarks/results/blocks_model.json)
run_part tune 240 90 "$out/tune_blocks.txt" python benchmarks/tune_blocks.py "${tune_args[@]}"
[ -s "$out/tune_blocks.txt" ] && grep -E ":  config|^  [* ] \(| default \(|model favours|wrote|Error" "$out/tune_blocks.txt" | tail -n 60

echo "== parts ($((SECONDS - start))s in all):"
column -t -s $'\t' "$out/parts.tsv" 2>/dev/null || cat "$out/parts.tsv"
exit $status
