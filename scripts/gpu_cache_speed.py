"""Decode-step cost of the cache kinds on an accelerator, in one run: int8/int4/KIVI storage
against the float cache, H2O and SnapKV against a ring of the same slots, and a streaming
ring's step at its start against after 16x its size.

    python scripts/gpu_cache_speed.py [--dtype bfloat16] [--out DIR] [--smoke]

Prints the machine, the versions, one JSON line per measurement and a table last."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from jaxkv.bench import caches
from jaxkv.bench.common import env_info, random_params
from jaxkv.config import preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs")
    args = ap.parse_args()
    print(json.dumps(env_info()), flush=True)
    if args.smoke:
        quant = [("test-gqa", 256, 512, 1)]
        scores = [("test-gqa", 64)]
        ring = 32
    else:
        # The first H200 run compiled llama-110m's four programs in ~60 s and did not finish
        # llama-1b's in 100 s more, so one point of each, the one where bytes matter first.
        quant = [("llama-1b", 4096, 8192, 8)]
        scores = [("llama-1b", 4096)]
        ring = 1024
    result: dict = {"env": env_info(), "kv_quant_step": [], "score_overhead": []}

    def save() -> None:
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cache_speed.json").write_text(json.dumps(result, indent=2))

    for name, position, capacity, batch in quant:
        t = time.perf_counter()
        row = caches.kv_quant_step(name, position, capacity, args.dtype, batch)
        row["wall_s"] = time.perf_counter() - t
        print(json.dumps(row), flush=True)
        result["kv_quant_step"].append(row)
        save()
    for name, slots in scores:
        row = caches.score_overhead(name, slots, dtype=args.dtype)
        print(json.dumps(row), flush=True)
        result["score_overhead"].append(row)
        save()
    small = preset("test-gqa" if args.smoke else "llama-110m").replace(dtype=args.dtype)
    params = random_params(small, jax.random.key(0))
    result["streaming"] = caches.streaming(small, params, ring)
    print(json.dumps(result["streaming"]), flush=True)
    save()
    print(f"\n| model | batch | pos/cap | {args.dtype} ms | int8 | int4 | int8 KIVI+res |")
    print("|---|---|---|---|---|---|---|")
    for r in result["kv_quant_step"]:
        print(
            f"| {r['model']} | {r['batch']} | {r['position']}/{r['capacity']} | "
            f"{r['step_ms_float']:.3f} | {r['int8_over_float']:.2f}x | "
            f"{r['int4_over_float']:.2f}x | {r['int8_kivi_residual_over_float']:.2f}x |"
        )
    for r in result["score_overhead"]:
        print(
            f"{r['model']} {r['slots']} slots: ring {r['step_ms']['ring']:.3f} ms, "
            f"H2O {r['h2o_over_ring']:.2f}x, SnapKV+ring {r['snapkv_ring_over_ring']:.2f}x"
        )
    s = result["streaming"]
    print(
        f"streaming ring of {s['ring_slots']} ({small.d_model}-wide): step after "
        f"{s['generated']} tokens / at start = {s['streaming_step_ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
