#!/usr/bin/env bash
# One prepared run on a lent GPU, sized for one ~9.5-minute call (give it timeout_s 590) (the device tool runs it from
# the repository root, with $OUT pointing at a folder that comes back; at most 8 files come
# back, so everything is written to a work folder and packed into $OUT/gpu_check.tgz at the
# end, with the short summary beside it). Each step has its own time limit, so one that
# hangs or fails leaves the others their time, and the whole script ends before the call's.
#   1. the GPU benchmark suite: copy bandwidth, ms/step and MBU for 1.1B and 7B bf16 models
#      at batch 1 and 8, scan against isolated steps, extras while time remains;
#   2. correctness on the GPU: cached == uncached, prefill, in-place compiled programs,
#      greedy == argmax loop, the ring/sinks/hybrid oracles (issue 12), H2O's and SnapKV's
#      kept slots against NumPy references and each quantized layout against a NumPy
#      quantization (issue 13);
#   3. chunked prefill: jaxkv's own attention against cuDNN's fused kernel (bf16);
#   4. decode-step cost of the cache kinds (int8/int4/KIVI against bf16, H2O and SnapKV
#      against a ring, a streaming ring's end against its start).
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
W=$(mktemp -d)
mkdir -p "$OUT"
finish() {
  tar czf "$OUT/gpu_check.tgz" -C "$W" .
  cp "$W/summary.txt" "$OUT/" 2>/dev/null
}
trap finish EXIT
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $W/NAME.txt, note the outcome
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$W/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit)" | tee -a "$W/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$W/summary.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tail -3 | tee -a "$W/summary.txt"
if [ "${ALLOW_CPU:-0}" != 1 ] && ! python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "JAX sees no GPU: stopping" | tee -a "$W/summary.txt"
  exit 1
fi

step bench "${BENCH_TIMEOUT:-200}" python3 scripts/bench.py --suite gpu --out "$W/gpu" \
  --extras-deadline "${EXTRAS_DEADLINE:-120}"
tail -40 "$W/bench.txt"
cat "$W/gpu/bench.md" >>"$W/summary.txt" 2>/dev/null

# Four workers share the GPU (no preallocation), so the many small compiles overlap.
XLA_PYTHON_CLIENT_PREALLOCATE=false \
  step tests "${TEST_TIMEOUT:-140}" python3 -m pytest -v -n "${TEST_WORKERS:-4}" \
  -p no:cacheprovider --durations=10 \
  tests/test_model.py::test_cached_equals_uncached_every_position \
  tests/test_model.py::test_prefill_returns_last_prompt_logits \
  tests/test_compiled.py tests/test_generate.py::test_greedy_generate_equals_naive_argmax_loop \
  tests/test_cache_kinds.py tests/test_heavy.py tests/test_snapkv.py tests/test_kv_layouts.py \
  -k "cached_equals or prefill_returns or compiled or greedy_generate_equals or ring_equals \
or sinks_equal or hybrid_layers or nan or reference or in_place or equals_dense or continues \
or numpy or residual"
tail -15 "$W/tests.txt" | tee -a "$W/summary.txt"

step prefill "${PREFILL_TIMEOUT:-80}" python3 scripts/prefill_attention.py --dtype bfloat16 \
  --tokens 4096 --repeats 2
tail -6 "$W/prefill.txt" | tee -a "$W/summary.txt"

step cache_speed "${CACHE_SPEED_TIMEOUT:-130}" python3 scripts/gpu_cache_speed.py \
  --dtype bfloat16 --out "$W/gpu"
tail -12 "$W/cache_speed.txt" | tee -a "$W/summary.txt"
