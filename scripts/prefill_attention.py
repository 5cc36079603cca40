"""Chunked prefill, jaxkv's own attention against jax.nn.dot_product_attention (cuDNN's fused
kernel on a GPU in bf16, XLA's elsewhere): time per prompt and the compiled scratch memory.

    python scripts/prefill_attention.py [--preset smollm2-135m] [--tokens 4096 16384]
        [--chunk 512] [--dtype bfloat16]

Random weights of the preset's shape; prints the machine, the versions and one line per case,
each case timed in turn with the other (best of --repeats)."""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import jaxkv
from jaxkv import attention
from jaxkv.bench.common import env_info
from jaxkv.loops import Loop, prefill_jit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(env_info()), flush=True)
    config = jaxkv.preset(args.preset)
    if args.dtype:
        config = config.replace(dtype=args.dtype)
    params = jaxkv.init_params(config, jax.random.key(0))
    for n in args.tokens:
        toks = np.random.default_rng(0).integers(0, config.vocab_size, (1, n)).astype(np.int32)
        pos = np.arange(n, dtype=np.int32)[None]
        fns = {}
        for fused in (False, True):
            attention.FUSED_PREFILL = fused
            jax.clear_caches()
            loop = Loop(config=config, capacity=n, cache_dtype=None, chunk=args.chunk)
            compiled = prefill_jit.lower(params, toks, pos, None, loop=loop).compile()
            fns[fused] = compiled
        best = {False: float("inf"), True: float("inf")}
        outs = {}
        for _ in range(args.repeats):
            for fused, fn in fns.items():
                t = time.perf_counter()
                outs[fused] = jax.block_until_ready(fn(params, toks, pos, None)[0])
                best[fused] = min(best[fused], time.perf_counter() - t)
        diff = float(np.abs(np.asarray(outs[True]) - np.asarray(outs[False])).max())
        for fused, fn in fns.items():
            mem = fn.memory_analysis()
            name = "dot_product_attention" if fused else "jaxkv attention"
            print(
                f"{args.preset} {config.dtype} prefill {n} tokens, chunk {args.chunk}, {name}: "
                f"{best[fused]:.3f} s ({n / best[fused]:.0f} tokens/s), scratch "
                f"{mem.temp_size_in_bytes / 2**20:.0f} MiB",
                flush=True,
            )
        print(
            f"  fused / own time ratio {best[True] / best[False]:.2f}; max |logit diff| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
