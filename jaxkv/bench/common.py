"""Measurement helpers shared by the CPU and GPU suites: environment, bandwidth, random
params, prefilled decode states, step timing, compiled cost and memory."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import KVCache
from jaxkv.config import ModelConfig
from jaxkv.loops import DecodeState, Loop, decode_step_jit, resume_jit
from jaxkv.model import Params, Transformer
from jaxkv.sampling import GREEDY


def env_info() -> dict[str, Any]:
    """Machine, versions and date, recorded with every result."""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": dev.platform,
        "device": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def best_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Smallest wall time of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(nbytes: int = 1 << 28, dtype: Any = jnp.float32) -> float:
    """Bytes per second of a streaming device update (bytes read + bytes written), best of
    several. The buffer is donated and rewritten in place, as a decode step's cache is (an
    out-of-place copy on CPU mostly measures the page faults of fresh allocations)."""
    n = nbytes // jnp.dtype(dtype).itemsize
    f = jax.jit(lambda a: a + jnp.asarray(1, dtype), donate_argnums=0)
    x = f(jnp.zeros((n,), dtype))
    x.block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n * jnp.dtype(dtype).itemsize / min(times)


def random_params(
    config: ModelConfig, key: jax.Array, dtype: Any = None, std: float = 0.02
) -> Params:
    """Random params made directly in `dtype` on the device (no float32 copy): normal(std)
    matrices, unit norm scales, zero biases."""
    dtype = jnp.dtype(dtype or config.dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda k: Transformer(config).init(k, tokens, tokens)["params"], key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    @jax.jit
    def make(keys: jax.Array) -> list[jax.Array]:
        out = []
        for (path, leaf), k in zip(leaves, keys, strict=True):
            name = getattr(path[-1], "key", str(path[-1]))
            if name == "scale":
                out.append(jnp.ones(leaf.shape, dtype))
            elif name in ("bias", "qkv_bias", "o_bias", "bi", "bo"):
                out.append(jnp.zeros(leaf.shape, dtype))
            else:
                out.append((std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype))
        return out

    return jax.tree_util.tree_unflatten(treedef, make(keys))


def param_bytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def weight_bytes_read(params: Params, config: ModelConfig, batch: int) -> int:
    """Weight bytes one decode step must read: every param except the embedding table, of
    which it reads `batch` rows (all of it when tied, as the LM head)."""
    total = param_bytes(params)
    if config.tie_embeddings:
        return total
    embed = params["embed"]
    return total - embed.size * embed.dtype.itemsize + batch * embed.shape[1] * embed.dtype.itemsize


def kv_bytes_read(config: ModelConfig, batch: int, filled: int, itemsize: int) -> int:
    """Bytes of K and V a step must read when `filled` slots per row are in use."""
    return 2 * config.n_layers * batch * filled * config.n_kv_heads * config.head_dim * itemsize


def synthetic_state(
    config: ModelConfig,
    batch: int,
    position: int,
    capacity: int,
    seed: int = 0,
    cache_dtype: str | None = None,
) -> DecodeState:
    """A decode state as if every row had `position` tokens stored (small random K/V), made
    without running (or compiling) a prefill. Decode speed does not depend on the values."""
    state = _synthetic_state(
        jax.random.key(seed),
        config=config,
        batch=batch,
        position=position,
        capacity=capacity,
        cache_dtype=cache_dtype,
    )
    jax.block_until_ready(state)
    return state


@functools.partial(
    jax.jit, static_argnames=("config", "batch", "position", "capacity", "cache_dtype")
)
def _synthetic_state(
    key: jax.Array,
    *,
    config: ModelConfig,
    batch: int,
    position: int,
    capacity: int,
    cache_dtype: str | None,
) -> DecodeState:
    dtype = config.jnp_dtype
    cache = KVCache.init(config, batch, capacity, cache_dtype)
    positions = jnp.arange(position, dtype=jnp.int32)
    plan = cache.plan_write(jnp.broadcast_to(positions, (batch, position)))
    shape = (batch, position, config.n_kv_heads, config.head_dim)
    layers = []
    for i, layer in enumerate(cache.layers):
        kk, kv = jax.random.split(jax.random.fold_in(key, i))
        k, v = jax.random.normal(kk, shape, dtype), jax.random.normal(kv, shape, dtype)
        layers.append(layer.write(k, v, plan))
    cache = cache.commit(plan, tuple(layers))
    return DecodeState(
        cache=cache,
        tokens=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        key=key,
    )


def scan_step_time(
    params: Params,
    config: ModelConfig,
    make_state: Callable[[], DecodeState],
    n_steps: int,
    span: int,
    repeats: int = 3,
) -> float:
    """Seconds per decode step inside one compiled lax.scan of n_steps (decode + sampling),
    the loop `generate` runs. Each timed run starts from a fresh prefilled state."""
    return interleaved_scan_step_times(params, config, [(make_state, span)], n_steps, repeats)[0]


def interleaved_scan_step_times(
    params: Params,
    config: ModelConfig,
    cases: list[tuple[Callable[[], DecodeState], int]],
    n_steps: int,
    rounds: int,
) -> list[float]:
    """`scan_step_time` of several (make_state, span) cases, timed in turn round after round
    (best of `rounds` each), so a slow spell of a shared machine hits every case alike: use
    it for ratios."""
    eos, pad = np.zeros(0, np.int32), np.int32(0)

    def run(make_state: Callable[[], DecodeState], span: int) -> float:
        state = make_state()
        t = time.perf_counter()
        loop = Loop(config=config, sampling=GREEDY, steps=((n_steps, span),))
        out = resume_jit(params, state, eos, pad, None, loop=loop)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    for case in cases:
        run(*case)  # compile
    times = [[run(*case) for case in cases] for _ in range(rounds)]
    return [min(col) / n_steps for col in zip(*times, strict=True)]


def time_donating_steps(step: Callable[[Any], tuple[Any, Any]], cache: Any, n_steps: int) -> float:
    """Seconds per call of `step(cache) -> (logits, cache)`, a donating decode step: one call
    to warm up, then n_steps calls from Python (dispatch is asynchronous; one block at the
    end)."""
    logits, cache = step(cache)
    jax.block_until_ready(logits)
    t = time.perf_counter()
    for _ in range(n_steps):
        logits, cache = step(cache)
    jax.block_until_ready((logits, cache))
    return (time.perf_counter() - t) / n_steps


def isolated_step_time(
    params: Params, config: ModelConfig, state: DecodeState, n_steps: int, span: int | None
) -> float:
    """Seconds per call of the jitted, donating decode_step, called n_steps times."""
    tokens, active = state.tokens, jnp.ones(state.tokens.shape, bool)
    span = None if span == state.cache.capacity else span
    return time_donating_steps(
        lambda c: decode_step_jit(params, c, tokens, active, loop=Loop(config=config, span=span)),
        state.cache,
        n_steps,
    )


def weight_matrices(params: Params, config: ModelConfig) -> list[jax.Array]:
    """Every weight matrix a decode step multiplies by, as [in, out] (free reshapes of the
    params): per layer qkv, o, wi, wo, then the output head."""
    out = []
    for i in range(config.n_layers):
        layer = params[f"layers_{i}"]
        qkv, o = layer["attn"]["qkv"], layer["attn"]["o"]
        wi, wo = layer["mlp"]["wi"], layer["mlp"]["wo"]
        out += [qkv.reshape(qkv.shape[0], -1), o.reshape(-1, o.shape[-1])]
        out += [wi.reshape(wi.shape[0], -1), wo]
    out.append(params["embed"].T if config.tie_embeddings else params["lm_head"])
    return out


@functools.partial(jax.jit, static_argnames=("n_steps",))
def _gemv_chain(x: jax.Array, mats: list[jax.Array], n_steps: int) -> jax.Array:
    def body(x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        d = x.shape[-1]
        for w in mats:
            v = jnp.resize(x, (1, w.shape[0])) if w.shape[0] != d else x
            y = v @ w
            x = jnp.tanh(jnp.resize(y, (1, d)) if y.shape[-1] < d else y[:, :d])
        return x, None

    return jax.lax.scan(body, x, None, length=n_steps)[0]


def gemv_chain_time(params: Params, config: ModelConfig, n_steps: int = 32) -> float:
    """Seconds per pass of XLA's matrix-vector products over a decode step's weight matrices
    alone (chained, so none can be skipped; no norms, attention or cache): the best this
    backend streams those weights, the ceiling for the weight part of a decode step."""
    mats = weight_matrices(params, config)
    x = jnp.ones((1, config.d_model), mats[0].dtype)
    return best_time(lambda: jax.block_until_ready(_gemv_chain(x, mats, n_steps)), 3) / n_steps


def compiled_flops(jitted: Any, *args: Any, **kwargs: Any) -> float:
    """FLOPs XLA's cost analysis counts for one call (a while loop's body counts once)."""
    cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def cache_sized_copies(hlo_text: str, capacity: int) -> list[str]:
    """Copy instructions of a compiled program whose result has a dimension of the cache's
    capacity (there should be none: the cache is updated in place)."""
    copy = re.compile(r"=\s*(\S+)\s+copy(-start)?\(")
    dims = re.compile(rf"\[[0-9,]*\b{capacity}\b[0-9,]*\]")
    return [
        line.strip()[:160]
        for line in hlo_text.splitlines()
        if (m := copy.search(line)) and dims.search(m.group(1))
    ]


def memory_analysis(jitted: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Argument, output, alias and temporary bytes of the compiled program."""
    m = jitted.lower(*args, **kwargs).compile().memory_analysis()
    if m is None:
        return {}
    return {
        k: int(getattr(m, f"{k}_size_in_bytes", 0))
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }


def dot_attention_step_time(
    params: Params,
    config: ModelConfig,
    state: DecodeState,
    n_steps: int,
    span: int,
    by_reduction: bool = False,
) -> float:
    """Isolated step time with decode attention forced to dots (or, with by_reduction, to
    multiply-reduce), in a fresh jit traced with attention.DECODE_BY_REDUCTION set."""
    from jaxkv import attention
    from jaxkv.loops import _decode

    loop = Loop(config=config)
    step = jax.jit(lambda p, c, t, a: _decode(p, c, t, a, span, loop), donate_argnums=1)
    tokens, active = state.tokens, jnp.ones(state.tokens.shape, bool)
    attention.DECODE_BY_REDUCTION = by_reduction
    try:  # the first call traces the step with the forced form
        logits, cache = step(params, state.cache, tokens, active)
        jax.block_until_ready(logits)
    finally:
        attention.DECODE_BY_REDUCTION = None
    return time_donating_steps(lambda c: step(params, c, tokens, active), cache, n_steps)
