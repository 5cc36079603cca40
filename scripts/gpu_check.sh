#!/usr/bin/env bash
# One prepared run on a lent GPU (the device tool runs it from the repository root, with $OUT
# pointing at a folder that comes back): the GPU benchmark suite, then the core correctness
# tests on the GPU.
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout "${BENCH_TIMEOUT:-360}" python3 scripts/bench.py --suite gpu --out "$OUT" 2>&1 \
  | tee "$OUT/bench_log.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_model.py::test_cached_equals_uncached_every_position \
  tests/test_model.py::test_prefill_returns_last_prompt_logits \
  tests/test_compiled.py tests/test_generate.py::test_greedy_generate_equals_naive_argmax_loop \
  2>&1 | tail -20 | tee "$OUT/tests.txt"
# Chunked prefill: jaxkv's own attention against cuDNN's fused kernel (bf16), SmolLM2's shape.
timeout "${PREFILL_TIMEOUT:-120}" python3 scripts/prefill_attention.py --dtype bfloat16 \
  --tokens 4096 16384 2>&1 | tee "$OUT/prefill_attention.txt"
# Cache kinds (issue 12): the ring, sinks and hybrid oracles and the in-place compiled
# programs on the GPU, then the cache benchmarks (streaming ratio, perplexity under a budget
# with the bundled model, hybrid 5:1, cost per step).
timeout "${CACHE_TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_cache_kinds.py -k "ring_equals or sinks_equal or hybrid_layers or compiled or nan" \
  2>&1 | tail -20 | tee "$OUT/cache_tests.txt"
# Issue 13: H2O's and SnapKV's kept slots against their NumPy references, each quantized
# layout against a NumPy quantization of the float cache, in-place programs, on the GPU.
timeout "${EVICT_TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_heavy.py tests/test_snapkv.py tests/test_kv_layouts.py \
  -k "reference or in_place or equals_dense or continues or numpy or residual" \
  2>&1 | tail -20 | tee "$OUT/evict_tests.txt"
# The cache benchmarks (eviction in both protocols, quantized layouts, their step times).
timeout "${CACHES_TIMEOUT:-300}" python3 scripts/bench.py --suite caches --quick \
  --out "$OUT/caches" 2>&1 | tee "$OUT/caches_log.txt"
