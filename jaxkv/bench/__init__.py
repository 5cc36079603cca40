"""Benchmarks: `python scripts/bench.py --suite cpu|gpu|real --out DIR [--quick]` (also
`jaxkv bench`). Writes DIR/bench.json, DIR/bench.md and PNG plots; prints the machine, the
versions and the numbers."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxkv.bench.report import markdown, plots


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxkv bench", description=__doc__)
    parser.add_argument("--suite", choices=["cpu", "caches", "gpu", "real"], default="cpu")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes (the CPU suite in under 5 minutes)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models: check the suite runs, numbers are meaningless",
    )
    parser.add_argument(
        "--extras-deadline",
        type=float,
        default=270.0,
        help="gpu suite: seconds after which no extra measurement (dot attention, layouts) starts",
    )
    args = parser.parse_args(argv)

    from jaxkv.bench import common

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "suite": args.suite,
        "quick": args.quick,
        "smoke": args.smoke,
        "env": common.env_info(),
    }
    print(json.dumps(result["env"], indent=2), flush=True)
    if args.suite == "real":
        from jaxkv.bench import real

        result.update(real.run(args.quick, smoke=args.smoke))
        result["total_s"] = time.perf_counter() - t0
        (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
        md = real.markdown(result)
        (out / "bench.md").write_text(md)
        print(md)
        print(f"wrote {out / 'bench.json'} in {result['total_s']:.0f}s")
        return 0
    if args.suite == "cpu":
        from jaxkv.bench import cpu

        copy_bw = common.copy_bandwidth()
        result["copy_bw_bytes_per_s"] = copy_bw
        result.update(cpu.run(args.quick, copy_bw, smoke=args.smoke))
    if args.suite in ("cpu", "caches"):
        from jaxkv.bench import caches

        result.update(caches.run(args.quick, smoke=args.smoke, out_dir=out))
    elif args.suite != "cpu":
        from jaxkv.bench import gpu

        def save(partial: dict[str, Any]) -> None:
            (out / "bench.partial.json").write_text(
                json.dumps({**result, **partial}, indent=2, default=str)
            )

        result.update(
            gpu.run(args.quick, smoke=args.smoke, save=save, extras_deadline_s=args.extras_deadline)
        )
    result["total_s"] = time.perf_counter() - t0
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    if args.suite == "caches":
        from jaxkv.bench.caches import markdown as caches_markdown

        md = caches_markdown(result)
    else:
        md = markdown(result)
        if "ppl_under_budget" in result:
            from jaxkv.bench.caches import markdown as caches_markdown

            md += "\n" + caches_markdown(result)
        for png in plots(result, out):
            print(f"wrote {png}")
    (out / "bench.md").write_text(md)
    print(md)
    print(f"wrote {out / 'bench.json'} in {result['total_s']:.0f}s")
    return 0
