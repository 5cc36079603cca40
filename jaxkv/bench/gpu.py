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
    cache_sized_copies,
    copy_bandwidth,
    dot_attention_step_time,
    kv_bytes_read,
    param_bytes,
    random_params,
    scan_step_time,
    synthetic_state,
    time_donating_steps,
    weight_bytes_read,
)
from jaxkv.cache import cache_memory_bytes
from jaxkv.config import ModelConfig, preset
from jaxkv.loops import Loop, decode_step_jit
from jaxkv.prefill import attention_span


def _log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _isolated(
    params: Any, config: ModelConfig, state: Any, n_steps: int, span: int
) -> tuple[float, dict[str, int], int]:
    """Seconds per isolated decode_step call, from one ahead-of-time compile that also gives
    the memory analysis and the count of cache-sized copies."""
    active = jnp.ones(state.tokens.shape, bool)
    span_arg = None if span == state.cache.capacity else span
    compiled = decode_step_jit.lower(
        params, state.cache, state.tokens, active, loop=Loop(config=config, span=span_arg)
    ).compile()
    m = compiled.memory_analysis()
    mem = (
        {
            k: int(getattr(m, f"{k}_size_in_bytes", 0))
            for k in ("argument", "output", "alias", "temp")
        }
        if m is not None
        else {}
    )
    copies = len(cache_sized_copies(compiled.as_text(), state.cache.capacity))
    seconds = time_donating_steps(
        lambda c: compiled(params, c, state.tokens, active), state.cache, n_steps
    )
    return seconds, mem, copies


def measure_core(
    name: str,
    config: ModelConfig,
    params: Any,
    copy_bw: float,
    batch: int,
    position: int,
    capacity: int,
    n_steps: int,
) -> dict[str, Any]:
    """ms/step (scan and isolated), MBU, memory and copies for one config and batch."""
    _log(f"{name}: batch {batch}")
    itemsize = jnp.dtype(config.dtype).itemsize
    span = attention_span(position + n_steps, capacity)
    make = lambda: synthetic_state(config, batch, position, capacity)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan_s = scan_step_time(params, config, make, n_steps, span, repeats=2)
        iso_s, mem, copies = _isolated(params, config, make(), n_steps, span)
    filled = position + n_steps // 2
    kv = kv_bytes_read(config, batch, filled, itemsize)
    need = weight_bytes_read(params, config, batch) + kv
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "batch": batch,
        "position": position,
        "capacity": capacity,
        "span": span,
        "scan_ms_per_step": scan_s * 1e3,
        "isolated_ms_per_step": iso_s * 1e3,
        "scan_vs_isolated": scan_s / iso_s,
        "bytes_per_step": need,
        "mbu": need / scan_s / copy_bw,
        "mbu_isolated": need / iso_s / copy_bw,
        "mbu_counting_whole_embedding": (param_bytes(params) + kv) / scan_s / copy_bw,
        "tokens_per_s": batch / scan_s,
        "param_bytes": param_bytes(params),
        "cache_bytes": cache_memory_bytes(config, batch, capacity),
        "compiled_memory": mem,
        "cache_sized_copies": copies,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "donation_warnings": [str(w.message) for w in caught if "donat" in str(w.message)],
    }


def run(
    quick: bool, smoke: bool = False, save: Any = None, extras_deadline_s: float = 270.0
) -> dict[str, Any]:
    """The suite. Core numbers first (every config and batch), then extras (dot attention,
    layer layouts) while time remains; `save(partial_result)` runs after each piece, so a run
    cut short by a time limit still leaves what it measured."""
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

    params_by_name = {}
    for name, config in configs.items():
        _log(f"{name}: random params")
        params = random_params(config, jax.random.key(0))
        jax.block_until_ready(params)
        entry = {"config": name, "param_count": config.param_count(), "rows": []}
        results.append(entry)
        for batch in (1, 8):
            entry["rows"].append(
                measure_core(name, config, params, copy_bw, batch, position, capacity, n_steps)
            )
            if save is not None:
                save(summary())
        params_by_name[name] = params if name == list(configs)[-1] else None
        del params
    # Extras, newest params first (the last config's are still alive), while time remains.
    span = attention_span(position + n_steps, capacity)
    for entry in reversed(results):
        name = entry["config"]
        config = configs[name]
        params = params_by_name.get(name)
        if time.perf_counter() - t0 > extras_deadline_s:
            break
        if params is None:
            params = random_params(config, jax.random.key(0))
        for row in entry["rows"]:
            if time.perf_counter() - t0 > extras_deadline_s:
                break
            _log(f"{name}: dot attention, batch {row['batch']}")
            state = synthetic_state(config, row["batch"], position, capacity)
            row["isolated_ms_per_step_dot_attention"] = 1e3 * dot_attention_step_time(
                params, config, state, n_steps, span
            )
            if save is not None:
                save(summary())
        if time.perf_counter() - t0 <= extras_deadline_s:
            _log(f"{name}: layer layouts")
            times = variants.layout_step_times(config, params, position, capacity, n_steps)
            entry["layouts_isolated_ms"] = {
                "unrolled_per_layer_cache": entry["rows"][0]["isolated_ms_per_step"],
                **{k: v * 1e3 for k, v in times.items()},
            }
            if save is not None:
                save(summary())
        params_by_name[name] = None
        del params
    return summary()
