"""Cache kinds, measured (part of `scripts/bench.py --suite cpu`):

- streaming: a ring generates 16x its size in one compiled loop; the step time at the end over
  the step time at the start, and the cache's bytes at both ends;
- perplexity under a budget (StreamingLLM's protocol, token by token, cache ~1/8 of the text):
  full cache, window only, sinks + window at cache positions and at original positions, and
  the recompute oracle; the bundled model on held-out Python files, the real model
  (SmolLM2-135M-Instruct, when fetched) on English prose; per-position curves as a plot;
- eviction at 20% and 50% of the text: H2O, sinks + window, window, random, and (after a
  prompt block) SnapKV followed by a ring or by H2O, in two protocols (`eviction_ppl`);
- quantized storage: each dtype and scale layout (per token and head, per token, KIVI, with
  and without the full-precision residual) against the float cache: perplexity change, top-1
  agreement, bytes per token (`kv_quant`); the decode step against float at 4096 of 8192
  (`kv_quant_step`); H2O's and SnapKV's step against a ring of the same slots
  (`score_overhead`);
- hybrid: K/V memory and step time of 5 local (W = 1024) per global layer against all-dense;
- cost per step: a long generation from a short prompt, total time against the sum of isolated
  steps at each position, with the decode loop in growing-span groups and in one group.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.bench.common import random_params
from jaxkv.cache import Dense, Window
from jaxkv.config import ModelConfig, preset
from jaxkv.decode import generate, prefill
from jaxkv.evaluation import perplexity, recompute_perplexity
from jaxkv.loops import Loop, decode_groups, resume_jit
from jaxkv.model import Params
from jaxkv.prefill import attention_span

SINKS = 4


def _log(msg: str) -> None:
    print(f"[bench caches] {msg}", flush=True)


def _time_resume(
    params: Params, config: ModelConfig, state: Any, n: int, span: Any
) -> tuple[float, Any]:
    """Seconds per step of an n-step scan from `state` (compiled beforehand; state donated)."""
    loop = Loop(config=config, steps=((n, span),))
    eos, pad = np.zeros(0, np.int32), np.int32(0)
    t = time.perf_counter()
    out = resume_jit(params, state, eos, pad, None, loop=loop)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n, out[0]


def streaming(config: ModelConfig, params: Params, ring: int, factor: int = 16) -> dict[str, Any]:
    """A sinks + window ring of `ring` slots generating factor x ring tokens in one loop."""
    kind = Window(ring - SINKS, sinks=SINKS)
    prompt = [[1, 2, 3]]
    n = factor * ring
    t = time.perf_counter()
    res = generate(params, config, prompt, max_new_tokens=n, cache=kind)
    jax.block_until_ready(res.tokens)
    first_call = time.perf_counter() - t
    emitted = int(res.lengths[0])
    end_state = res.state
    start = generate(params, config, prompt, max_new_tokens=ring, cache=kind).state
    steps = 64
    times: dict[str, list[float]] = {"start": [], "end": []}
    bytes_start, bytes_end = start.cache.nbytes(), end_state.cache.nbytes()
    for _ in range(4):  # alternate, so a noisy spell hits both ends alike; first round compiles
        t0, start = _time_resume(params, config, start, steps, None)
        t1, end_state = _time_resume(params, config, end_state, steps, None)
        times["start"].append(t0)
        times["end"].append(t1)
    s0, s1 = min(times["start"][1:]), min(times["end"][1:])
    return {
        "ring_slots": ring,
        "generated": n,
        "emitted": emitted,
        "first_call_s": first_call,
        "step_ms_start": s0 * 1e3,
        "step_ms_end": s1 * 1e3,
        "streaming_step_ratio": s1 / s0,
        "cache_bytes_start": bytes_start,
        "cache_bytes_end": bytes_end,
        "final_position": int(end_state.cache.lengths[0]),
    }


def ppl_under_budget(
    config: ModelConfig,
    params: Params,
    tokens: np.ndarray,
    budget: int,
    label: str,
    recompute_stride: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Perplexity of `tokens` under each policy at `budget` cache slots."""
    n = len(tokens)
    w = budget - SINKS
    policies: dict[str, Any] = {
        "full": None,
        "window": Window(budget),
        "sinks+window (cache positions)": Window(w, sinks=SINKS, positions="cache"),
        "sinks+window (original positions)": Window(w, sinks=SINKS, positions="original"),
    }
    rows, curves = [], {}
    for name, kind in policies.items():
        t = time.perf_counter()
        ppl, nll = perplexity(params, config, tokens, capacity=n, cache=kind)
        _log(f"{label}: {name}: ppl {ppl:.3f} ({time.perf_counter() - t:.1f}s)")
        rows.append({"model": label, "policy": name, "budget": budget, "tokens": n, "ppl": ppl})
        curves[name] = nll
    t = time.perf_counter()
    ppl, nll = recompute_perplexity(
        params, config, tokens, sinks=SINKS, window=w, stride=recompute_stride
    )
    _log(f"{label}: recompute: ppl {ppl:.3f} ({time.perf_counter() - t:.1f}s)")
    name = "recompute" if recompute_stride == 1 else f"recompute (every {recompute_stride}th token)"
    rows.append({"model": label, "policy": name, "budget": budget, "tokens": n, "ppl": ppl})
    if recompute_stride == 1:
        curves["recompute"] = nll
    return rows, curves


def plot_curves(curves: dict[str, np.ndarray], title: str, path: Path, every: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, nll in curves.items():
        k = max(1, len(nll) // every)
        m = len(nll) // k * k
        ppl = np.exp(nll[:m].reshape(-1, k).mean(axis=1))
        ax.plot(np.arange(len(ppl)) * k + k / 2, ppl, label=name)
    ax.set_xlabel("position")
    ax.set_ylabel(f"perplexity (mean NLL per {k} tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_eviction(rows: list[dict[str, Any]], model: str, path: Path) -> None:
    """Perplexity against the budget, one line per policy, one panel per protocol (the full
    cache as a dashed line)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    mine = [r for r in rows if r["model"] == model]
    protocols = list(dict.fromkeys(r["protocol"] for r in mine))
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.5), squeeze=False)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        here = [r for r in mine if r["protocol"] == protocol]
        for policy in dict.fromkeys(r["policy"] for r in here):
            pts = sorted((r["budget_fraction"], r["ppl"]) for r in here if r["policy"] == policy)
            if policy == "full":
                ax.axhline(pts[0][1], color="black", linestyle="--", label="full")
                continue
            ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
        ax.set_xlabel("budget (fraction of the text)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(f"{model}: {protocol}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eviction_ppl(
    config: ModelConfig, params: Params, tokens: np.ndarray, label: str
) -> list[dict[str, Any]]:
    """Perplexity at 20% and 50% of the text length under two protocols:

    - "stream": the whole text token by token (every policy evicts while decoding): H2O (half
      heavy, half recent), sinks + window, window only, random eviction;
    - "prompt": the first half as one prefill block (compressed to the budget by the policy's
      block rule), then the second half token by token, scored on the second half: the same
      policies plus SnapKV (window min(32, budget / 4)) followed by a ring ("snapkv+window")
      or by H2O ("snapkv+h2o").

    Each protocol has its own full-cache row."""
    from jaxkv.cache import Heavy, SnapKV

    n = len(tokens)
    rows = []
    for protocol, prompt in (("stream", 0), ("prompt", n // 2)):
        full, _ = perplexity(params, config, tokens, capacity=n, prompt=prompt)
        rows.append(
            {
                "model": label,
                "protocol": protocol,
                "policy": "full",
                "budget_fraction": 1.0,
                "ppl": full,
            }
        )
        for frac in (0.2, 0.5):
            b = int(n * frac)
            policies = {
                "h2o": Heavy(b // 2, b - b // 2),
                "sinks+window": Window(b - SINKS, sinks=SINKS),
                "window": Window(b),
                "random": Heavy(b // 2, b - b // 2, "random"),
            }
            if prompt:
                w = min(32, b // 4)
                policies["snapkv+window"] = SnapKV(b, w, decode="ring")
                policies["snapkv+h2o"] = SnapKV(b, w, decode="h2o")
            for name, kind in policies.items():
                ppl, _ = perplexity(params, config, tokens, capacity=n, cache=kind, prompt=prompt)
                _log(f"{label}: {protocol}: {name} at {frac:.0%} ({b} slots): ppl {ppl:.3f}")
                rows.append(
                    {
                        "model": label,
                        "protocol": protocol,
                        "policy": name,
                        "budget_fraction": frac,
                        "ppl": ppl,
                    }
                )
    return rows


def kv_quant(
    config: ModelConfig, params: Params, tokens: np.ndarray, label: str
) -> list[dict[str, Any]]:
    """Quantized storage against the float cache, token by token over `tokens` (full cache):
    perplexity change, top-1 agreement of the next-token argmax, bytes per cached token
    (K, V and scales of every layer, positions included)."""
    from jaxkv.cache import cache_memory_bytes
    from jaxkv.evaluation import token_scores

    n = len(tokens)

    def per_token(dtype: Any) -> float:
        return (
            cache_memory_bytes(config, 1, 2 * n, dtype) - cache_memory_bytes(config, 1, n, dtype)
        ) / n

    ref_nll, ref_top1 = token_scores(params, config, tokens)
    ref_ppl = float(np.exp(ref_nll.mean()))
    rows = [
        {
            "model": label,
            "dtype": config.dtype,
            "scales": "-",
            "bytes_per_token": per_token(None),
            "ppl": ref_ppl,
            "ppl_delta": 0.0,
            "top1_agreement": 1.0,
        }
    ]
    from jaxkv.cache.quant import KVQuant

    layouts = [
        ("head", False, "per token and KV head"),
        ("token", False, "per token"),
        ("kivi", False, "KIVI: keys per channel (32 tokens), values per token and head"),
        ("head", True, "per token and KV head + residual 32"),
        ("kivi", True, "KIVI + residual 32"),
    ]
    for dtype, (scales, residual, name) in itertools.product(("int8", "int4"), layouts):
        spec = KVQuant(dtype, scales, 32, residual)
        t = time.perf_counter()
        nll, top1 = token_scores(params, config, tokens, cache_dtype=spec)
        ppl = float(np.exp(nll.mean()))
        took = time.perf_counter() - t
        _log(f"{label}: {spec.describe()}: ppl {ppl:.4f} vs {ref_ppl:.4f} ({took:.1f}s)")
        rows.append(
            {
                "model": label,
                "dtype": dtype,
                "scales": name,
                "bytes_per_token": per_token(spec),
                "ppl": ppl,
                "ppl_delta": ppl - ref_ppl,
                "top1_agreement": float((top1 == ref_top1).mean()),
            }
        )
    return rows


def kv_quant_step(
    name: str, position: int, capacity: int, dtype: str = "float32", batch: int = 1
) -> dict[str, Any]:
    """Decode step time of int8 and int4 caches (and int8 KIVI with its residual) against
    the float cache (`dtype`, also the model's) at `position` of `capacity` (programs compiled
    first, then timed in alternation)."""
    from jaxkv.bench.common import synthetic_state
    from jaxkv.cache.quant import KVQuant

    config = preset(name).replace(dtype=dtype)
    params = random_params(config, jax.random.key(0))
    span = attention_span(position + 32, capacity)
    loop = Loop(config=config, steps=((32, None if span >= capacity else span),))
    eos, pad = np.zeros(0, np.int32), np.int32(0)
    kivi = KVQuant("int8", "kivi", 32, residual=True)
    dtypes = (None, "int8", "int4", kivi)
    progs = {
        d: resume_jit.lower(
            params,
            synthetic_state(config, batch, position, capacity, cache_dtype=d),
            eos,
            pad,
            None,
            loop=loop,
        ).compile()
        for d in dtypes
    }
    times: dict[Any, list[float]] = {d: [] for d in dtypes}
    for _ in range(5):
        for d, prog in progs.items():
            state = synthetic_state(config, batch, position, capacity, cache_dtype=d)
            t = time.perf_counter()
            jax.block_until_ready(prog(params, state, eos, pad, None))
            times[d].append((time.perf_counter() - t) / 32)
    best = {d: min(v) for d, v in times.items()}
    return {
        "model": name,
        "dtype": dtype,
        "batch": batch,
        "position": position,
        "capacity": capacity,
        "step_ms_float": best[None] * 1e3,
        "step_ms_int8": best["int8"] * 1e3,
        "step_ms_int4": best["int4"] * 1e3,
        "int8_over_float": best["int8"] / best[None],
        "int4_over_float": best["int4"] / best[None],
        "step_ms_int8_kivi_residual": best[kivi] * 1e3,
        "int8_kivi_residual_over_float": best[kivi] / best[None],
    }


def score_overhead(
    name: str, slots: int, steps: int = 64, dtype: str = "float32"
) -> dict[str, Any]:
    """Decode step time of H2O (half heavy, half recent) and SnapKV + ring against a ring
    of the same number of slots, each full (a 2 x slots prompt), timed in alternation."""
    from jaxkv.cache import Heavy, SnapKV

    config = preset(name).replace(dtype=dtype)
    params = random_params(config, jax.random.key(0))
    kinds = {
        "ring": Window(slots),
        "h2o": Heavy(slots // 2, slots - slots // 2),
        "snapkv+ring": SnapKV(slots, 32, decode="ring"),
    }
    prompt = [[int(i % (config.vocab_size - 1)) + 1 for i in range(2 * slots)]]

    def fresh(kind: Any) -> Any:  # ready before the clock starts
        return jax.block_until_ready(
            generate(params, config, prompt, max_new_tokens=1, cache=kind).state
        )

    for kind in kinds.values():  # compile
        _time_resume(params, config, fresh(kind), steps, None)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(3):
        for label, kind in kinds.items():
            t, _ = _time_resume(params, config, fresh(kind), steps, None)
            times[label].append(t)
    best = {k: min(v) * 1e3 for k, v in times.items()}
    return {
        "model": name,
        "dtype": dtype,
        "slots": slots,
        "step_ms": best,
        "h2o_over_ring": best["h2o"] / best["ring"],
        "snapkv_ring_over_ring": best["snapkv+ring"] / best["ring"],
    }


def hybrid(position: int, capacity: int = 32768) -> dict[str, Any]:
    """5 local layers (W = 1024) per global layer, against the same model all-dense."""
    types = ("sliding_attention",) * 5 + ("full_attention",)
    config = preset("llama-3m").replace(n_layers=6, sliding_window=1024, layer_types=types)
    params = random_params(config, jax.random.key(0), jnp.float32)
    out: dict[str, Any] = {"pattern": "5 x ring(1024) + 1 x dense", "capacity": capacity}
    rng = np.random.default_rng(0)
    prompt = [rng.integers(0, config.vocab_size, position).tolist()]
    times, nbytes = {}, {}
    for name, kind in (("hybrid", None), ("dense", Dense())):
        _, cache = prefill(params, config, prompt, capacity=capacity, cache=kind)
        nbytes[name] = cache.nbytes()
        state = generate(params, config, prompt, max_new_tokens=2, capacity=capacity, cache=kind)
        state = state.state
        span = decode_groups(position + 16, 64, capacity, True)[0][1]
        best = []
        for _ in range(4):
            t, state = _time_resume(params, config, state, 64, span)
            best.append(t)
        times[name] = min(best[1:])
    out.update(
        memory_bytes_hybrid=nbytes["hybrid"],
        memory_bytes_dense=nbytes["dense"],
        hybrid_memory_ratio=nbytes["dense"] / nbytes["hybrid"],
        position=position,
        step_ms_hybrid=times["hybrid"] * 1e3,
        step_ms_dense=times["dense"] * 1e3,
        hybrid_step_ratio=times["dense"] / times["hybrid"],
    )
    return out


def cost_per_step(config: ModelConfig, params: Params, n_new: int) -> dict[str, Any]:
    """Total time of an n_new-token generation from a 16-token prompt (growing-span groups, and
    one group over the final reach as before), against the sum of isolated decode steps at
    each position (measured at 8 positions, integrated)."""
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    capacity = 16 + n_new

    def timed(**kw: Any) -> float:
        generate(params, config, prompt, max_new_tokens=n_new, **kw)  # compile
        best = []
        for _ in range(2):
            t = time.perf_counter()
            jax.block_until_ready(
                generate(params, config, prompt, max_new_tokens=n_new, **kw).tokens
            )
            best.append(time.perf_counter() - t)
        return min(best)

    grouped = timed()
    import jaxkv.loops as loops

    saved = loops.MAX_DECODE_GROUPS
    loops.MAX_DECODE_GROUPS = 1
    try:
        one_group = timed(capacity=capacity + 1)  # another capacity: a separate compile
    finally:
        loops.MAX_DECODE_GROUPS = saved
    marks = np.linspace(16, capacity - 64, 8).astype(int)
    step_s = []
    for p in marks:  # 32 steps in a scan from position p, over the slots filled by then
        row = [int(i % (config.vocab_size - 1)) + 1 for i in range(p)]
        state = generate(params, config, [row], max_new_tokens=1, capacity=capacity).state
        span = attention_span(p + 32, capacity)
        span = None if span >= capacity else span
        _, state = _time_resume(params, config, state, 32, span)  # compile
        best = []
        for _ in range(3):
            t, state = _time_resume(params, config, state, 32, span)
            best.append(t)
        step_s.append(min(best))
    isolated_sum = float(np.trapezoid(step_s, marks)) * n_new / float(marks[-1] - marks[0])
    return {
        "new_tokens": n_new,
        "groups": [list(g) for g in decode_groups(16, n_new - 1, capacity, True)],
        "total_s_grouped": grouped,
        "total_s_one_group": one_group,
        "isolated_steps_sum_s": isolated_sum,
        "grouped_over_isolated": grouped / isolated_sum,
        "one_group_over_isolated": one_group / isolated_sum,
        "isolated_step_ms": {int(p): s * 1e3 for p, s in zip(marks, step_s, strict=True)},
    }


def run(quick: bool, smoke: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
    from jaxkv.train import heldout_sample

    out: dict[str, Any] = {}
    small = preset("test-gqa") if smoke else preset("llama-3m")
    p_small = random_params(small, jax.random.key(0), jnp.float32)
    ring = 32 if smoke else 256
    _log(f"streaming: ring of {ring} slots, 16x its size")
    out["streaming"] = streaming(small, p_small, ring)
    out["streaming_step_ratio"] = out["streaming"]["streaming_step_ratio"]

    rows: list[dict[str, Any]] = []
    from jaxkv.checkpoint import load_pretrained
    from jaxkv.cli import BUNDLED_MODEL as bundled
    from jaxkv.tokenizer import load_tokenizer

    cfg_b, params_b = load_pretrained(bundled)
    tok_b = load_tokenizer(bundled)
    n_text = 256 if smoke else 2048 if quick else 4096
    ids = np.asarray(tok_b.encode(heldout_sample(4 * n_text).decode("utf-8", "replace")))[:n_text]
    r, curves = ppl_under_budget(cfg_b, params_b, ids, n_text // 8, "bundled (held-out Python)")
    rows += r
    if out_dir is not None:
        plot_curves(
            curves,
            f"bundled model, cache {n_text // 8} of {n_text}",
            out_dir / "ppl_bundled.png",
            64,
        )
    real = _real_model()
    if real is not None and not smoke:
        from jaxkv.evaluation import eval_text

        cfg_r, params_r, tok_r = real
        n_real = 1024 if quick else 9216  # the full suite runs past SmolLM2's 8k context
        ids = np.asarray(tok_r.encode(eval_text()))[:n_real]
        r, curves = ppl_under_budget(
            cfg_r,
            params_r,
            ids,
            n_real // 8,
            "SmolLM2-135M (prose)",
            recompute_stride=16 if quick else 128,
        )
        rows += r
        if out_dir is not None:
            plot_curves(
                curves,
                f"SmolLM2-135M, cache {n_real // 8} of {n_real}",
                out_dir / "ppl_smollm2.png",
                64,
            )
    out["ppl_under_budget"] = rows

    ids_q = np.asarray(tok_b.encode(heldout_sample(4 * n_text).decode("utf-8", "replace")))
    n_ev = 128 if smoke else 1024 if quick else 2048
    out["eviction_ppl"] = eviction_ppl(cfg_b, params_b, ids_q[:n_ev], "bundled (held-out Python)")
    if real is not None and not smoke:
        ids_r = np.asarray(tok_r.encode(eval_text()))[: 512 if quick else 2048]
        out["eviction_ppl"] += eviction_ppl(cfg_r, params_r, ids_r, "SmolLM2-135M (prose)")
    if out_dir is not None:
        for model in dict.fromkeys(r["model"] for r in out["eviction_ppl"]):
            name = "smollm2" if model.startswith("SmolLM2") else "bundled"
            plot_eviction(out["eviction_ppl"], model, out_dir / f"eviction_{name}.png")
    out["kv_quant"] = kv_quant(cfg_b, params_b, ids_q[: n_text // 2], "bundled (held-out Python)")
    if real is not None and not smoke:
        ids_r = np.asarray(tok_r.encode(eval_text()))[: 512 if quick else 2048]
        out["kv_quant"] += kv_quant(cfg_r, params_r, ids_r, "SmolLM2-135M (prose)")
    points = [("test-gqa", 256, 512)] if smoke else [("llama-3m", 4096, 8192)]
    if not smoke:
        points.append(("llama-110m", 4096, 8192))
    out["kv_quant_step"] = []
    for name, position, capacity in points:
        _log(f"quantized decode step: {name} at {position} of {capacity}")
        out["kv_quant_step"].append(kv_quant_step(name, position, capacity))
    out["kv_quant_step_ratio"] = out["kv_quant_step"][0]["int8_over_float"]

    out["score_overhead"] = []
    for name, slots in [("test-gqa", 64)] if smoke else [("llama-3m", 1024), ("llama-110m", 1024)]:
        _log(f"H2O and SnapKV step against a ring: {name}, {slots} slots")
        out["score_overhead"].append(score_overhead(name, slots))

    _log("hybrid 5:1, W = 1024, capacity 32768")
    out["hybrid"] = hybrid(256 if smoke else 4096)
    out["hybrid_memory_ratio"] = out["hybrid"]["hybrid_memory_ratio"]
    n_new = 256 if smoke else 2048 if quick else 4096
    _log(f"cost per step: {n_new} new tokens")
    out["cost_per_step"] = cost_per_step(small, p_small, n_new)
    return out


def _real_model() -> tuple[Any, Any, Any] | None:
    from jaxkv.paths import smollm2_path

    path = smollm2_path()
    if not path.exists():
        return None
    from jaxkv.checkpoint import load_pretrained
    from jaxkv.tokenizer import load_tokenizer

    config, params = load_pretrained(path)
    return config, params, load_tokenizer(path)


def markdown(result: dict[str, Any]) -> str:
    """The cache sections of BENCHMARKS.md."""
    st, hy, cps = result["streaming"], result["hybrid"], result["cost_per_step"]
    lines = [
        "### Streaming (ring of sinks + window)",
        "",
        f"{st['generated']} tokens from a ring of {st['ring_slots']} slots in one compiled loop "
        f"({st['emitted']} emitted, final position {st['final_position']}): step "
        f"{st['step_ms_start']:.3f} ms at the start, {st['step_ms_end']:.3f} ms at the end, "
        f"ratio **{st['streaming_step_ratio']:.3f}**; cache {st['cache_bytes_start']:,} bytes "
        f"at the start and {st['cache_bytes_end']:,} at the end.",
        "",
        "### Perplexity under a budget (token by token)",
        "",
        "| model | tokens | budget | policy | ppl |",
        "|---|---:|---:|---|---:|",
    ]
    for r in result["ppl_under_budget"]:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['budget']} | {r['policy']} | {r['ppl']:.3f} |"
        )
    lines += [
        "",
        f"### Hybrid ({hy['pattern']}, capacity {hy['capacity']})",
        "",
        f"K/V memory {hy['memory_bytes_hybrid']:,} vs {hy['memory_bytes_dense']:,} bytes "
        f"all-dense: **{hy['hybrid_memory_ratio']:.2f}x** less; step at position "
        f"{hy['position']}: {hy['step_ms_hybrid']:.3f} ms vs {hy['step_ms_dense']:.3f} ms "
        f"({hy['hybrid_step_ratio']:.2f}x).",
        "",
        "### Eviction policies at a budget",
        "",
        "Stream: the whole text token by token. Prompt: the first half as one prefill block "
        "(compressed to the budget), the second half token by token and scored.",
        "",
        "| model | protocol | budget | full | h2o | sinks+window | window | random "
        "| snapkv+window | snapkv+h2o |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_eviction_rows(result.get("eviction_ppl", [])),
        "",
        "### Quantized storage (full cache, token by token)",
        "",
        "| model | dtype | scales | bytes/token | ppl | ppl change | top-1 agreement |",
        "|---|---|---|---:|---:|---:|---:|",
        *[
            f"| {r['model']} | {r['dtype']} | {r['scales']} | {r['bytes_per_token']:.0f} | "
            f"{r['ppl']:.4f} | {r['ppl_delta']:+.4f} | {r['top1_agreement']:.4f} |"
            for r in result.get("kv_quant", [])
        ],
        "",
        "| model | at / capacity | float ms | int8 ms | int4 ms | int8 KIVI+res ms "
        "| int8/float | int4/float | KIVI+res/float |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['model']} | {r['position']} / {r['capacity']} | {r['step_ms_float']:.3f} | "
            f"{r['step_ms_int8']:.3f} | {r['step_ms_int4']:.3f} | "
            f"{r.get('step_ms_int8_kivi_residual', float('nan')):.3f} | "
            f"{r['int8_over_float']:.2f} | {r['int4_over_float']:.2f} | "
            f"{r.get('int8_kivi_residual_over_float', float('nan')):.2f} |"
            for r in result.get("kv_quant_step", [])
        ],
        "",
        "### Score-based eviction: step time against a ring of the same slots",
        "",
        "| model | slots | ring ms | H2O ms | SnapKV+ring ms | H2O/ring | SnapKV+ring/ring |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['model']} | {r['slots']} | {r['step_ms']['ring']:.3f} | "
            f"{r['step_ms']['h2o']:.3f} | {r['step_ms']['snapkv+ring']:.3f} | "
            f"{r['h2o_over_ring']:.2f} | {r['snapkv_ring_over_ring']:.2f} |"
            for r in result.get("score_overhead", [])
        ],
        "",
        "### Cost per step follows the filled length",
        "",
        f"{cps['new_tokens']} new tokens from a 16-token prompt: "
        f"{cps['total_s_grouped']:.2f} s in growing-span groups {cps['groups']}, "
        f"{cps['total_s_one_group']:.2f} s in one group over the final reach; the isolated "
        f"steps at each position sum to {cps['isolated_steps_sum_s']:.2f} s "
        f"(ratios {cps['grouped_over_isolated']:.2f} and {cps['one_group_over_isolated']:.2f}).",
        "",
    ]
    return "\n".join(lines)


def _eviction_rows(rows: list[dict[str, Any]]) -> list[str]:
    policies = ("h2o", "sinks+window", "window", "random", "snapkv+window", "snapkv+h2o")
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for protocol in dict.fromkeys(r.get("protocol", "stream") for r in rows):
            mine = [
                r for r in rows if r["model"] == model and r.get("protocol", "stream") == protocol
            ]
            if not mine:
                continue
            full = next(r["ppl"] for r in mine if r["policy"] == "full")
            for frac in sorted({r["budget_fraction"] for r in mine} - {1.0}):
                got = {r["policy"]: r["ppl"] for r in mine if r["budget_fraction"] == frac}
                cells = " | ".join(f"{got[p]:.3f}" if p in got else "-" for p in policies)
                out.append(f"| {model} | {protocol} | {frac:.0%} | {full:.3f} | {cells} |")
    return out
