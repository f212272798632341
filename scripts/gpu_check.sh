#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA GPU, in one command, into one report.
#
# On a box with an NVIDIA GPU and the project's .venv (vllm==0.32.* from `make install`):
#   1. the CUDA cases of the kernel tests (Triton gather vs its PyTorch reference);
#   2. the engine tests (LoRA and n-gram speculation included: the Triton LoRA
#      kernels run there only) under each CUDA attention backend VTW
#      supports: TRITON_ATTN in float32 (the tests' tolerances are fp32's) and
#      FLASH_ATTN in bfloat16 (FlashAttention has no fp32; comparisons bound by fp32
#      tolerances may fail there, read the per-test results); FlashInfer must be refused;
#   3. with 2+ GPUs: the tensor / pipeline parallel engine tests and the serving benchmark
#      at TP = 2;
#   4. the gather-kernel benchmark and the serving benchmark (stock vs VTW, both at their
#      defaults, i.e. compiled with PIECEWISE CUDA graphs, prefix caching on).
# Writes benchmarks/results/gpu_check/ (report.md, junit XML per run, logs).
# Without a GPU it says so and exits 0: everything in it that can run on CPU is in `make test`.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "[gpu-check] needs an NVIDIA GPU (nvidia-smi finds none): nothing to do here."
  echo "[gpu-check] The CPU-runnable parts of this check are covered by 'make test'."
  exit 0
fi
PY=.venv/bin/python
OUT=benchmarks/results/gpu_check
mkdir -p "$OUT"
REPORT="$OUT/report.md"
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD))"
  echo '```'; nvidia-smi -L; "$PY" -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'; echo '```'
} > "$REPORT"

run() {  # name, then the command; records pass/fail in the report
  local name=$1; shift
  echo "[gpu-check] $name"
  if "$@" > "$OUT/$name.log" 2>&1; then status=pass; else status=FAIL; fi
  echo "- $name: **$status** (log: \`$name.log\`)" >> "$REPORT"
}

run kernel-tests "$PY" -m pytest -q tests/test_gather_rows.py --junitxml="$OUT/kernel-tests.xml"
ENGINE_TESTS="tests/test_vtw_engine.py tests/test_kv_accounting.py tests/test_prefix_cache.py tests/test_qwen_vl.py tests/test_lora.py tests/test_speculative.py"
# VLLM_LOGGING_LEVEL=DEBUG turns on vLLM's check that every CUDA graph replays with the
# input addresses it captured: a layer span fed a tensor at a new address each step (the
# clone between spans, for one) fails loudly instead of reading stale
# memory.
for spec in TRITON_ATTN:float32 FLASH_ATTN:bfloat16; do
  backend=${spec%%:*} dtype=${spec##*:}
  VLLM_LOGGING_LEVEL=DEBUG VTW_TEST_ATTENTION_BACKEND=$backend VTW_TEST_DTYPE=$dtype \
    run "engine-$backend-$dtype" "$PY" -m pytest -q $ENGINE_TESTS --junitxml="$OUT/engine-$backend.xml"
done
# Several GPUs: VTW at TP = 2 (test_kv_accounting), TP = 2 x PP = 2 and TP = 2 over two
# nodes on loopback (test_parallel; the 4-rank case skips with fewer than 4 GPUs).
NUM_GPUS=$(nvidia-smi -L | wc -l)
if [ "$NUM_GPUS" -ge 2 ]; then
  VTW_TEST_ATTENTION_BACKEND=TRITON_ATTN run "parallel-$NUM_GPUS-gpus" "$PY" -m pytest -q \
    tests/test_kv_accounting.py tests/test_parallel.py --junitxml="$OUT/parallel.xml"
  run serving-bench-tp2 "$PY" benchmarks/serving/run.py --parts defaults online \
    --tensor-parallel-size 2 --out "$OUT/tp2"
else
  echo "- parallel: not run (one GPU; TP/PP need 2-4)" >> "$REPORT"
fi
VTW_TEST_ATTENTION_BACKEND=FLASHINFER run flashinfer-refused "$PY" -m pytest -q \
  "tests/test_refusals.py::test_refused_with_a_clear_error"
run kernel-bench "$PY" benchmarks/kernels/bench_gather_rows.py --out "$OUT"
run serving-bench "$PY" benchmarks/serving/run.py --out "$OUT"
echo "[gpu-check] report: $REPORT"
cat "$REPORT"
