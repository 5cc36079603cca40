"""The GPU suite: copy bandwidth, ms/step and MBU for 1.1B- and 7B-shaped random bf16 models
at batch 1 and 8, scan generation against isolated steps, layer layouts, and memory.

MBU = bytes a step must read (all weights + the filled part of the cache) / measured copy
bandwidth / step time. Designed to finish in a few minutes on one H100.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv.bench import variants
from jaxkv.bench.common import (
    copy_bandwidth,
    dot_attention_step_time,
    isolated_step_time,
    kv_bytes_read,
    memory_analysis,
    param_bytes,
    random_params,
    scan_step_time,
    synthetic_state,
)
from jaxkv.cache import cache_memory_bytes
from jaxkv.config import ModelConfig, preset
from jaxkv.decode import _decode_step_jit, attention_span


def _log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure_config(
    name: str,
    config: ModelConfig,
    copy_bw: float,
    batches: list[int],
    position: int,
    capacity: int,
    n_steps: int,
    layouts: bool,
) -> dict[str, Any]:
    _log(f"{name}: random params")
    params = random_params(config, jax.random.key(0))
    jax.block_until_ready(params)
    pbytes = param_bytes(params)
    itemsize = jnp.dtype(config.dtype).itemsize
    span = attention_span(position + n_steps, capacity)
    rows = []
    for batch in batches:
        _log(f"{name}: batch {batch}")
        make = lambda b=batch: synthetic_state(config, b, position, capacity)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan_s = scan_step_time(params, config, make, n_steps, span, repeats=2)
            iso_s = isolated_step_time(params, config, make(), n_steps, span)
        donation_warnings = [str(w.message) for w in caught if "donat" in str(w.message)]
        dot_s = dot_attention_step_time(params, config, make(), n_steps, span)
        filled = position + n_steps // 2
        need = pbytes + kv_bytes_read(config, batch, filled, itemsize)
        state = make()
        mem = memory_analysis(
            _decode_step_jit,
            params,
            state.cache,
            state.tokens,
            jnp.ones((batch,), bool),
            config=config,
            span=span,
        )
        stats = jax.devices()[0].memory_stats() or {}
        rows.append(
            {
                "batch": batch,
                "position": position,
                "capacity": capacity,
                "span": span,
                "scan_ms_per_step": scan_s * 1e3,
                "isolated_ms_per_step": iso_s * 1e3,
                "scan_vs_isolated": scan_s / iso_s,
                "isolated_ms_per_step_dot_attention": dot_s * 1e3,
                "bytes_per_step": need,
                "mbu": need / scan_s / copy_bw,
                "mbu_isolated": need / iso_s / copy_bw,
                "tokens_per_s": batch / scan_s,
                "param_bytes": pbytes,
                "cache_bytes": cache_memory_bytes(config, batch, capacity),
                "compiled_memory": mem,
                "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                "donation_warnings": donation_warnings,
            }
        )
        del state
    out: dict[str, Any] = {"config": name, "param_count": config.param_count(), "rows": rows}
    if layouts:
        _log(f"{name}: layer layouts")
        out["layouts_isolated_ms"] = {
            "unrolled_per_layer_cache": rows[0]["isolated_ms_per_step"],
            **{
                k: v * 1e3
                for k, v in variants.layout_step_times(
                    config, params, position, capacity, n_steps
                ).items()
            },
        }
    return out


def run(quick: bool, smoke: bool = False, save: Any = None) -> dict[str, Any]:
    """The suite; `save(partial_result)` is called after each config, so a run cut short by
    a time limit still leaves what it measured."""
    t0 = time.perf_counter()
    if smoke:  # exercise the code path on any machine with tiny models
        configs = {"test-gqa": preset("test-gqa").replace(dtype="bfloat16")}
        position, capacity, n_steps, nbytes = 32, 256, 8, 1 << 24
    else:
        configs = {"llama-1b": preset("llama-1b"), "llama-7b": preset("llama-7b")}
        position, capacity, n_steps, nbytes = 1024, 8192, 64, 1 << 31
    _log("copy bandwidth")
    copy_bw = copy_bandwidth(nbytes, jnp.bfloat16)
    results: list[dict[str, Any]] = []

    def summary() -> dict[str, Any]:
        mbu = {r["config"]: {str(x["batch"]): x["mbu"] for x in r["rows"]} for r in results}
        return {
            "copy_bw_bytes_per_s": copy_bw,
            "mbu": mbu,
            "configs": results,
            "gpu_suite_s": time.perf_counter() - t0,
        }

    for i, (name, config) in enumerate(configs.items()):
        results.append(
            measure_config(
                name, config, copy_bw, [1, 8], position, capacity, n_steps, layouts=(i == 0)
            )
        )
        if save is not None:
            save(summary())
    return summary()
