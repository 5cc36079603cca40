"""Turn a benchmark result into a markdown summary and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _env_line(env: dict[str, Any]) -> str:
    v = env.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch", "transformers") if k in v)
    return (
        f"{env['date']} · {env['device']} ({env['platform']}) · CPU: {env['cpu']} "
        f"({env['cpu_count']} cores) · Python {env['python']} · {libs}"
    )


def markdown(r: dict[str, Any]) -> str:
    out = [
        f"## {r['suite'].upper()} suite{' (quick)' if r.get('quick') else ''}"
        f"{' (SMOKE: tiny models, numbers meaningless)' if r.get('smoke') else ''}",
        "",
        _env_line(r["env"]),
        "",
    ]
    bw = r.get("copy_bw_bytes_per_s")
    if bw:
        out += [f"Copy bandwidth (read + write): {bw / 1e9:.1f} GB/s", ""]
    if "cached_vs_uncached" in r:
        out += [
            "### Cached vs uncached generation (llama-3m, prompt 32, batch 1, greedy)",
            "",
            _table(
                [
                    "T",
                    "cached s",
                    "uncached s",
                    "time ratio",
                    "XLA FLOP ratio",
                    "analytic ratio",
                    "time/FLOP ratio",
                    "cached GFLOP/s",
                    "uncached GFLOP/s",
                    "same tokens",
                ],
                [
                    [
                        x["T"],
                        x["cached_s"],
                        x["uncached_s"],
                        x["time_ratio"],
                        x["flop_ratio"],
                        x["analytic_ratio"],
                        x["time_ratio"] / x["flop_ratio"],
                        x.get("cached_gflop_s", float("nan")),
                        x.get("uncached_gflop_s", float("nan")),
                        x["same_tokens"],
                    ]
                    for x in r["cached_vs_uncached"]
                ],
            ),
            "",
        ]
    if "step_vs_cache" in r:
        s = r["step_vs_cache"]
        out += [
            "### Decode step against the cache (llama-3m, batch 1, ms/step in a scan)",
            "",
            _table(
                ["capacity", "position", "length-aware ms", "full-capacity ms"],
                [
                    [
                        x["capacity"],
                        x["position"],
                        x["step_s"] * 1e3,
                        x["full_capacity_step_s"] * 1e3,
                    ]
                    for x in s["by_capacity"] + s["by_position"]
                ],
            ),
            "",
            f"capacity_step_ratio ({' / '.join(reversed(list(s.get('interleaved_step_s', {}))))}"
            ", the two timed in turn): "
            f"{r['capacity_step_ratio']:.3f} (from the sweep above: "
            f"{s.get('capacity_step_ratio_sweep', float('nan')):.3f})",
            "",
        ]
    if r.get("vs_transformers"):
        out += [
            "### Against Hugging Face transformers (batch 1, greedy, same weights)",
            "",
            _table(
                [
                    "config",
                    "params",
                    "new tokens",
                    "jaxkv tok/s",
                    "HF tok/s",
                    "speedup",
                    "same tokens",
                ],
                [
                    [
                        x["config"],
                        x["params"],
                        x["new_tokens"],
                        x["jaxkv_tok_s"],
                        x["hf_tok_s"],
                        x["speedup"],
                        x["same_tokens"],
                    ]
                    for x in r["vs_transformers"]
                ],
            ),
            "",
        ]
    if "weight_bandwidth" in r:
        w = r["weight_bandwidth"]
        for name, key in (
            ("llama-110m", "weight_bandwidth"),
            ("llama-3m", "weight_bandwidth_small"),
        ):
            if key in r:
                x = r[key]
                out += [
                    f"Weight bandwidth ({name}, batch 1): {x['step_s'] * 1e3:.3g} ms/step in "
                    f"a scan ({x['isolated_step_s'] * 1e3:.3g} ms isolated), "
                    f"{x['weight_bytes_per_s'] / 1e9:.1f} GB/s = "
                    f"{x['fraction_of_copy_bw']:.2f} of the copy bandwidth "
                    f"({x.get('copy_bw_bytes_per_s', float('nan')) / 1e9:.1f} GB/s, measured "
                    "in turn with the step); XLA's matrix-vector products over the same "
                    f"weights alone: {x.get('gemv_chain_s', float('nan')) * 1e3:.3g} ms, "
                    f"{x.get('gemv_chain_bytes_per_s', float('nan')) / 1e9:.1f} GB/s = "
                    f"{x.get('gemv_chain_fraction_of_copy_bw', float('nan')):.2f}",
                    "",
                ]
        mem = w.get("compiled_memory") or {}
        if mem:
            out += [
                f"Compiled decode step memory (llama-110m, capacity 256): arguments "
                f"{mem['argument'] / 2**20:.1f} MiB (params {w['param_bytes'] / 2**20:.1f} + "
                f"cache {w['cache_bytes'] / 2**20:.1f}), aliased to outputs "
                f"{mem['alias'] / 2**20:.1f} MiB, temporaries {mem['temp'] / 2**20:.2f} MiB",
                "",
            ]
    if r.get("layouts_isolated_ms"):
        layouts = r["layouts_isolated_ms"]
        names = list(next(iter(layouts.values())))
        out += [
            "### Layer and cache layouts (batch 1, isolated ms/step)",
            "",
            _table(
                ["model, point", *names], [[k, *(v[n] for n in names)] for k, v in layouts.items()]
            ),
            "",
        ]
    if "compilation" in r:
        c = r["compilation"]
        out += [
            f"Compilation (llama-110m, whole generation): {c['compile_s']:.2f}s over "
            f"{c['compilations_first_call']} compilations; a second prompt in the same "
            f"bucket: {c['compilations_second_call_same_bucket']} compilations",
            "",
        ]
    if "configs" in r:
        rows = []
        for cfg in r["configs"]:
            for x in cfg["rows"]:
                rows.append(
                    [
                        cfg["config"],
                        x["batch"],
                        x["position"],
                        x["capacity"],
                        x["scan_ms_per_step"],
                        x["isolated_ms_per_step"],
                        x.get("isolated_ms_per_step_dot_attention", "-"),
                        x["mbu"],
                        x["scan_vs_isolated"],
                        x["tokens_per_s"],
                        x.get("cache_sized_copies", "-"),
                    ]
                )
        out += [
            "### GPU decode (random bf16 weights)",
            "",
            _table(
                [
                    "config",
                    "batch",
                    "position",
                    "capacity",
                    "scan ms/step",
                    "isolated ms/step",
                    "isolated ms/step, dot attention",
                    "MBU",
                    "scan/isolated",
                    "tok/s",
                    "cache copies",
                ],
                rows,
            ),
            "",
        ]
        for cfg in r["configs"]:
            if "layouts_isolated_ms" in cfg:
                out += [
                    f"Layer/cache layouts, {cfg['config']} batch 1 (isolated ms/step): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in cfg["layouts_isolated_ms"].items()),
                    "",
                ]
    return "\n".join(out)


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if "cached_vs_uncached" in r:
        xs = r["cached_vs_uncached"]
        fig, ax = plt.subplots(figsize=(6, 4))
        t = [x["T"] for x in xs]
        ax.plot(t, [x["time_ratio"] for x in xs], "o-", label="wall-time ratio")
        ax.plot(t, [x["flop_ratio"] for x in xs], "s-", label="XLA FLOP ratio")
        ax.plot(t, [x["analytic_ratio"] for x in xs], "--", label="analytic ratio")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="new tokens T",
            ylabel="uncached / cached",
            title="Cached vs uncached generation",
        )
        ax.legend()
        written.append(out / "cached_vs_uncached.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "step_vs_cache" in r:
        s = r["step_vs_cache"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, rows in (
            (axes[0], "capacity", s["by_capacity"]),
            (axes[1], "position", s["by_position"]),
        ):
            xv = [x[key] for x in rows]
            ax.plot(xv, [x["step_s"] * 1e3 for x in rows], "o-", label="length-aware span")
            ax.plot(
                xv,
                [x["full_capacity_step_s"] * 1e3 for x in rows],
                "s--",
                label="attend over whole capacity",
            )
            ax.set(xscale="log" if key == "capacity" else "linear", xlabel=key, ylabel="ms / step")
            ax.legend()
        axes[0].set_title("step time vs capacity (position 128)")
        axes[1].set_title(f"step time vs position (capacity {s['by_position'][0]['capacity']})")
        written.append(out / "step_vs_cache.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written
