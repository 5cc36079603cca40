"""The CPU suite: cached vs uncached generation, step time against the cache, tokens/s
against Hugging Face transformers, compilation, and weight bandwidth."""

from __future__ import annotations

import functools
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.bench import variants
from jaxkv.bench.common import (
    best_time,
    compiled_flops,
    copy_bandwidth,
    gemv_chain_time,
    interleaved_scan_step_times,
    isolated_step_time,
    memory_analysis,
    param_bytes,
    random_params,
    scan_step_time,
    synthetic_state,
    weight_bytes_read,
    weight_matrices,
)
from jaxkv.cache import cache_memory_bytes
from jaxkv.config import ModelConfig, preset
from jaxkv.decode import generate
from jaxkv.loops import Loop, decode_step_jit, prefill_jit
from jaxkv.model import Params, _forward
from jaxkv.prefill import PREFILL_CHUNK, attention_span, bucket_length


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- (a)


def _uncached_generate(
    params: Params, config: ModelConfig, prompt: list[int], n: int, bucket: int
) -> tuple[list[int], list[int]]:
    """Greedy generation without a cache: the whole sequence goes through `forward` at every
    step (right-padded to a multiple of `bucket`, so it compiles a few shapes). Returns the
    tokens and the padded width used at each step."""
    seq = list(prompt)
    widths = []
    for _ in range(n):
        width = -(-len(seq) // bucket) * bucket
        tokens = np.zeros((1, width), np.int32)
        positions = np.full((1, width), -1, np.int32)
        tokens[0, : len(seq)] = seq
        positions[0, : len(seq)] = np.arange(len(seq))
        logits = _forward(params, config, tokens, positions)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        widths.append(width)
    return seq[len(prompt) :], widths


def cached_vs_uncached(
    config: ModelConfig, params: Params, lengths: list[int], prompt_len: int = 32, bucket: int = 32
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, size=prompt_len).tolist()
    fwd_flops: dict[int, float] = {}
    out = []
    for n in lengths:
        _log(f"cached vs uncached, T={n}")
        run = lambda n=n: np.asarray(generate(params, config, [prompt], max_new_tokens=n).tokens)
        cached_tokens = run()
        t_cached = best_time(run, repeats=3, warmup=0)
        _uncached_generate(params, config, prompt, n, bucket)  # compile every width
        t0 = time.perf_counter()
        uncached_tokens, widths = _uncached_generate(params, config, prompt, n, bucket)
        t_uncached = time.perf_counter() - t0
        for w in set(widths) - set(fwd_flops):
            tok = np.zeros((1, w), np.int32)
            fwd_flops[w] = compiled_flops(_forward, params, config, tok, tok)
        uncached = sum(fwd_flops[w] for w in widths)
        # The generate loop is a lax.scan; XLA's cost analysis counts a loop body once, so
        # count prefill + (n - 1) separately compiled decode steps of the same span.
        s = bucket_length(prompt_len, 1 << 30)
        capacity = s + n
        tok = np.zeros((1, s), np.int32)
        prefill_loop = Loop(config=config, capacity=capacity, cache_dtype=None, chunk=PREFILL_CHUNK)
        pre = compiled_flops(prefill_jit, params, tok, tok, None, loop=prefill_loop)
        cache = jax.eval_shape(
            functools.partial(prefill_jit, loop=prefill_loop), params, tok, tok, None
        )[1]
        span = attention_span(s + n, capacity)
        step = compiled_flops(
            decode_step_jit,
            params,
            cache,
            np.zeros(1, np.int32),
            np.ones(1, bool),
            loop=Loop(config=config, span=None if span == capacity else span),
        )
        cached = pre + (n - 1) * step
        tokens_uncached = sum(prompt_len + t for t in range(n))
        out.append(
            {
                "T": n,
                "cached_s": t_cached,
                "uncached_s": t_uncached,
                "time_ratio": t_uncached / t_cached,
                "cached_flops": cached,
                "uncached_flops": uncached,
                "flop_ratio": uncached / cached,
                "cached_gflop_s": cached / t_cached / 1e9,
                "uncached_gflop_s": uncached / t_uncached / 1e9,
                "analytic_ratio": tokens_uncached / (prompt_len + n),
                "same_tokens": cached_tokens[0].tolist() == uncached_tokens,
            }
        )
    return out


# --------------------------------------------------------------------------- (b)


def step_vs_cache(
    config: ModelConfig,
    params: Params,
    capacities: list[int],
    positions: list[int],
    fixed_position: int,
    fixed_capacity: int,
    n_steps: int = 32,
) -> dict[str, Any]:
    """Step time against capacity at a short position, and against position at a fixed
    capacity; the length-aware span next to attention over the whole capacity."""

    def measure(capacity: int, position: int, full: bool) -> float:
        span = capacity if full else attention_span(position + n_steps, capacity)
        make = lambda: synthetic_state(config, 1, position, capacity)
        return scan_step_time(params, config, make, n_steps, span, repeats=5)

    by_capacity = []
    for c in capacities:
        _log(f"step vs capacity {c}")
        by_capacity.append(
            {
                "capacity": c,
                "position": fixed_position,
                "step_s": measure(c, fixed_position, False),
                "full_capacity_step_s": measure(c, fixed_position, True),
            }
        )
    by_position = []
    for p in positions:
        _log(f"step vs position {p}")
        by_position.append(
            {
                "capacity": fixed_capacity,
                "position": p,
                "step_s": measure(fixed_capacity, p, False),
                "full_capacity_step_s": measure(fixed_capacity, p, True),
            }
        )
    # The ratio from the two ends timed in turn (a slow spell of the shared machine during one
    # point of the sweep above would otherwise decide it).
    lo, hi = capacities[0], capacities[-1]
    _log(f"capacity {hi} against {lo}, interleaved")
    cases = [
        (
            lambda c=c: synthetic_state(config, 1, fixed_position, c),
            attention_span(fixed_position + n_steps, c),
        )
        for c in (lo, hi)
    ]
    t_lo, t_hi = interleaved_scan_step_times(params, config, cases, n_steps, rounds=10)
    return {
        "by_capacity": by_capacity,
        "by_position": by_position,
        "capacity_step_ratio": t_hi / t_lo,
        "capacity_step_ratio_sweep": by_capacity[-1]["step_s"] / by_capacity[0]["step_s"],
        "interleaved_step_s": {str(lo): t_lo, str(hi): t_hi},
    }


# --------------------------------------------------------------------------- (c)


def vs_transformers(
    name: str, config: ModelConfig, n_new: int, prompt_len: int = 32, threads: int | None = None
) -> dict[str, Any]:
    """Greedy tokens/s of jaxkv.generate and of transformers' generate on the same weights
    (batch 1), and whether they produce the same tokens."""
    import torch
    import transformers

    from jaxkv.checkpoint import load_pretrained, save_pretrained

    _log(f"vs transformers: {name}")
    params = random_params(config, jax.random.key(1), jnp.float32, std=0.05)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, size=prompt_len).tolist()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(params, config, d)
        config, params = load_pretrained(d, dtype="float32")  # exactly what HF loads
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early: time n_new tokens
    model.generation_config.pad_token_id = 0
    if threads:
        torch.set_num_threads(threads)
    run = lambda: np.asarray(generate(params, config, [prompt], max_new_tokens=n_new).tokens)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)  # else transformers masks prompt tokens equal to pad_token_id

    def hf() -> Any:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False)

    ours, theirs = run(), hf()[0, prompt_len:].tolist()  # (and warm up)
    # Timed in turn, best of each, so a slow spell of the shared machine hits both alike.
    t_ours, t_hf = float("inf"), float("inf")
    for _ in range(3):
        t_ours = min(t_ours, best_time(run, repeats=2, warmup=0))
        t_hf = min(t_hf, best_time(hf, repeats=1, warmup=0))
    return {
        "config": name,
        "params": config.param_count(),
        "new_tokens": n_new,
        "jaxkv_tok_s": n_new / t_ours,
        "hf_tok_s": n_new / t_hf,
        "speedup": t_hf / t_ours,
        "same_tokens": ours[0].tolist() == theirs,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- (d)


def compilation(config: ModelConfig, params: Params, n_new: int) -> dict[str, Any]:
    """Compile time and number of compilations of a whole generation with a fresh config."""
    events: list[tuple[str, float]] = []

    def listen(name: str, secs: float, **_: Any) -> None:
        events.append((name, secs))

    jax.monitoring.register_event_duration_secs_listener(listen)
    fresh = config.replace(norm_eps=config.norm_eps * 1.0001)  # nothing cached for it
    prompt = [[1, 2, 3, 4, 5]]
    t = time.perf_counter()
    np.asarray(generate(params, fresh, prompt, max_new_tokens=n_new).tokens)
    first = time.perf_counter() - t
    n_first = sum(1 for e, _ in events if e == "/jax/core/compile/backend_compile_duration")
    compile_s = sum(
        s
        for e, s in events
        if e
        in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
        )
    )
    events.clear()
    t = time.perf_counter()
    np.asarray(generate(params, fresh, [[7, 8, 9]], max_new_tokens=n_new).tokens)
    second = time.perf_counter() - t
    n_second = sum(1 for e, _ in events if e == "/jax/core/compile/backend_compile_duration")
    return {
        "compile_s": compile_s,
        "compilations_first_call": n_first,
        "first_call_s": first,
        "second_call_s": second,
        "compilations_second_call_same_bucket": n_second,
    }


# --------------------------------------------------------------------------- bandwidth


def weight_bandwidth(
    config: ModelConfig, params: Params, copy_bw: float, n_steps: int = 32
) -> dict[str, Any]:
    """Weight bytes a decode step reads / step time, as a fraction of the copy bandwidth.
    The step and the copy bandwidth are measured in turn (best of each), and the fraction
    uses the best copy bandwidth seen, this run's `copy_bw` included."""
    _log(f"weight bandwidth: {config.param_count() / 1e6:.0f}M params")
    make = lambda: synthetic_state(config, 1, 32, 256)
    span = attention_span(32 + n_steps, 256)
    step, bw, gemv = float("inf"), copy_bw, float("inf")
    for _ in range(3):
        bw = max(bw, copy_bandwidth())
        step = min(step, scan_step_time(params, config, make, n_steps, span, repeats=3))
        gemv = min(gemv, gemv_chain_time(params, config))
    iso = isolated_step_time(params, config, make(), n_steps, span)
    read = weight_bytes_read(params, config, 1)
    matrix_bytes = sum(w.size * w.dtype.itemsize for w in weight_matrices(params, config))
    state = make()
    mem = memory_analysis(
        decode_step_jit,
        params,
        state.cache,
        state.tokens,
        jnp.ones((1,), bool),
        loop=Loop(config=config, span=span),
    )
    return {
        "compiled_memory": mem,
        "cache_bytes": cache_memory_bytes(config, 1, 256),
        "config_params": config.param_count(),
        "weight_bytes_read": read,
        "param_bytes": param_bytes(params),
        "step_s": step,
        "isolated_step_s": iso,
        "weight_bytes_per_s": read / step,
        "copy_bw_bytes_per_s": bw,
        "fraction_of_copy_bw": read / step / bw,
        # XLA's products over the same matrices alone, timed in turn with the step.
        "gemv_chain_s": gemv,
        "gemv_chain_bytes_per_s": matrix_bytes / gemv,
        "gemv_chain_fraction_of_copy_bw": matrix_bytes / gemv / bw,
    }


def run(quick: bool, copy_bw: float, smoke: bool = False) -> dict[str, Any]:
    small = preset("llama-3m")
    large = preset("llama-110m")
    lengths = [64, 256, 512] if quick else [64, 128, 256, 512, 1024]
    capacities = [512, 4096, 32768] if quick else [512, 1024, 2048, 4096, 8192, 16384, 32768]
    positions = [128, 1024, 4096] if quick else [128, 512, 1024, 2048, 4096, 7936]
    if smoke:  # check the code path only
        small = preset("test-gqa").replace(max_seq_len=4096)
        large = preset("test-mqa")
        lengths, capacities, positions = [8, 16], [256, 1024], [16, 64]
    params_small = random_params(small, jax.random.key(0), jnp.float32)
    params_large = random_params(large, jax.random.key(0), jnp.float32)
    out: dict[str, Any] = {}
    out["cached_vs_uncached"] = cached_vs_uncached(small, params_small, lengths)
    out["step_vs_cache"] = step_vs_cache(
        small, params_small, capacities, positions, fixed_position=128, fixed_capacity=8192
    )
    out["capacity_step_ratio"] = out["step_vs_cache"]["capacity_step_ratio"]
    out["weight_bandwidth"] = weight_bandwidth(large, params_large, copy_bw)
    out["cpu_weight_bw_fraction"] = out["weight_bandwidth"]["fraction_of_copy_bw"]
    # The small model's weights fit in the last-level cache: its rate bounds a decode step's
    # FLOP rate (2 FLOPs per 4-byte weight read), which the cached-vs-uncached ratio meets.
    out["weight_bandwidth_small"] = weight_bandwidth(small, params_small, copy_bw)
    out["layouts_isolated_ms"] = {}
    points = [(16, 64)] if smoke else [(1024, 2048)] if quick else [(128, 512), (1024, 2048)]
    for name, cfg, p in (("llama-3m", small, params_small), ("llama-110m", large, params_large)):
        for position, capacity in points:
            _log(f"layer/cache layouts: {name}, position {position} of {capacity}")
            span = attention_span(position + 32, capacity)
            state = synthetic_state(cfg, 1, position, capacity)
            lib = isolated_step_time(p, cfg, state, 32, span)
            alt = variants.layout_step_times(cfg, p, position, capacity, 32)
            out["layouts_isolated_ms"][f"{name}, position {position} of {capacity}"] = {
                "unrolled_per_layer_cache": lib * 1e3,
                **{k: v * 1e3 for k, v in alt.items()},
            }
    out["compilation"] = compilation(large, params_large, 16)
    out["compile_s"] = out["compilation"]["compile_s"]
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        out["vs_transformers"] = []
        out["vs_transformers_skipped"] = "torch/transformers not installed"
    else:
        n_new = 8 if smoke else 64 if quick else 128
        out["vs_transformers"] = [
            vs_transformers("llama-3m", small, n_new, threads=2),
            vs_transformers("llama-110m", large, n_new, threads=2),
        ]
    return out
