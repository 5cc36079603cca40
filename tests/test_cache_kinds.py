"""Every cache kind against its oracle: the ring window (uncached forward with the same
sliding window), attention sinks (forward on the kept tokens), hybrid local/global layers
(the all-dense cache), plus slot contents, stale slots, reuse and the compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ATOL, count_compiles, random_prompts, reference_logits, tiny, tiny_cfg

import jaxkv
from jaxkv.cache import Dense, Heavy, KVCache, RingLayer, Window, WritePlan
from jaxkv.loops import Loop, decode_step_jit, resume_jit

W = 4


# --------------------------------------------------------------------------- slot contents
# Hugging Face's synthetic cache tests: one layer, one head, head_dim 1, scalar K/V, W = 4.


def _write(ring: RingLayer, values: list[float], start: int) -> RingLayer:
    n = len(values)
    pos = jnp.arange(start, start + n, dtype=jnp.int32)[None]
    plan = WritePlan(
        index=jnp.int32(0),
        valid=jnp.ones((1, n), bool),
        positions=pos,
        old_positions=jnp.zeros((1, 0), jnp.int32),
    )
    kv = jnp.asarray(values, jnp.float32).reshape(1, n, 1, 1)
    return ring.write(kv, kv * 10, plan)


def _slots(ring: RingLayer) -> tuple[list[float], list[float], list[int]]:
    return (
        np.asarray(ring.k)[0, 0, 0].tolist(),
        np.asarray(ring.v)[0, 0, :, 0].tolist(),
        np.asarray(ring.pos)[0].tolist(),
    )


def test_ring_slot_contents_short_prefill_then_wrap():
    ring = RingLayer.zeros(1, W, 1, 1, jnp.float32)
    ring = _write(ring, [1.0, 2.0], 0)
    assert _slots(ring) == ([1, 2, 0, 0], [10, 20, 0, 0], [0, 1, -1, -1])
    ring = _write(ring, [3.0], 2)
    ring = _write(ring, [4.0], 3)
    assert _slots(ring)[0] == [1, 2, 3, 4]
    ring = _write(ring, [5.0], 4)  # the wrap: position 4 takes position 0's slot
    assert _slots(ring) == ([5, 2, 3, 4], [50, 20, 30, 40], [4, 1, 2, 3])
    ring = _write(ring, [6.0], 5)
    assert _slots(ring) == ([5, 6, 3, 4], [50, 60, 30, 40], [4, 5, 2, 3])


def test_ring_slot_contents_long_prompt():
    """A 6-token prompt into 4 slots keeps its last 4 tokens (no duplicate scatter)."""
    ring = RingLayer.zeros(1, W, 1, 1, jnp.float32)
    ring = _write(ring, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0)
    assert _slots(ring) == ([5, 6, 3, 4], [50, 60, 30, 40], [4, 5, 2, 3])
    ring = _write(ring, [7.0], 6)
    assert _slots(ring) == ([5, 6, 7, 4], [50, 60, 70, 40], [4, 5, 6, 3])


def test_sink_slot_contents():
    ring = RingLayer.zeros(1, 3, 1, 1, jnp.float32, sinks=2)
    ring = _write(ring, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 0)
    # sinks 0, 1 in slots 0, 1; the window (positions 4, 5, 6) in slots 2 + (p - 2) % 3.
    assert _slots(ring)[0] == [1, 2, 6, 7, 5]
    assert _slots(ring)[2] == [0, 1, 5, 6, 4]
    ring = _write(ring, [8.0], 7)
    assert _slots(ring)[2] == [0, 1, 5, 6, 7]


# --------------------------------------------------------------------------- oracles


def _drive(params, cfg, cache, seqs, plens, steps):
    """Prefill each row's prompt into `cache` (via generate's prefill path), then feed the rest
    of each sequence one token per step; yields (logits [B, V], positions of the logits)."""
    logits, cache = jaxkv.prefill(
        params, cfg, [s[:p] for s, p in zip(seqs, plens, strict=True)], cache=cache
    )
    cur = list(plens)
    yield np.asarray(logits), [c - 1 for c in cur]
    for _ in range(steps):
        toks = np.array([s[c] for s, c in zip(seqs, cur, strict=True)], np.int32)
        logits, cache = jaxkv.decode_step(params, cfg, cache, toks)
        yield np.asarray(logits), list(cur)
        cur = [c + 1 for c in cur]


PLENS = [W - 1, W, W + 1, 2 * W + 3]


def test_ring_equals_uncached_sliding_window_forward(rng):
    """A model with sliding_window = W on a ring of W slots: every logit, on a ragged batch,
    through prompts shorter than, equal to and longer than W and generations that wrap the
    ring several times."""
    cfg, params = tiny_cfg(sliding_window=W)
    steps = 3 * W + 2
    seqs = random_prompts(rng, [p + steps for p in PLENS], cfg.vocab_size)
    ref = reference_logits(params, cfg, seqs)
    cache = KVCache.init(cfg, len(seqs), 64)
    assert all(isinstance(layer, RingLayer) and layer.slots == W for layer in cache.layers)
    for logits, at in _drive(params, cfg, cache, seqs, PLENS, steps):
        for b, t in enumerate(at):
            np.testing.assert_allclose(logits[b], ref[b][t], atol=ATOL, rtol=0)


def test_window_kind_on_a_full_attention_model_is_a_sliding_window(rng):
    """Window(W) on a model without a window: the logits of the same model with
    sliding_window = W (generate, one compiled loop, 6 W tokens)."""
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, PLENS, cfg.vocab_size)
    n = 6 * W
    got = jaxkv.generate(params, cfg, prompts, max_new_tokens=n, cache=Window(W))
    assert np.asarray(got.lengths).tolist() == [n] * len(prompts)
    windowed = cfg.replace(sliding_window=W)
    want = jaxkv.generate(params, windowed, prompts, max_new_tokens=n, cache=Dense())
    np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_sinks_equal_forward_on_the_kept_tokens(rng, positions):
    """sinks=s, window=W: at every step past the budget the logits equal the uncached forward
    on tokens[:s] + tokens[t-W:t], at positions 0..s+W-1 (cache positions) or at the tokens'
    original positions; before it, the plain forward. One layer: with more, the kept tokens'
    keys in later layers were computed when they saw the evicted tokens, which the oracle
    recomputes without (that is the "recompute" baseline of the perplexity benchmark)."""
    s = 2
    cfg, params = tiny_cfg(n_layers=1)
    steps = 3 * W
    seqs = random_prompts(rng, [p + steps for p in PLENS], cfg.vocab_size)
    cache = KVCache.init(cfg, len(seqs), kinds=Window(W, sinks=s, positions=positions))
    for logits, at in _drive(params, cfg, cache, seqs, PLENS, steps):
        for b, t in enumerate(at):
            n = t + 1
            if n <= s + W:
                kept, pos = seqs[b][:n], list(range(n))
            else:
                kept = seqs[b][:s] + seqs[b][n - W : n]
                pos = list(range(s + W)) if positions == "cache" else [0, 1, *range(n - W, n)]
            ref = jaxkv.forward(params, cfg, [kept], [pos])[0, -1]
            np.testing.assert_allclose(logits[b], ref, atol=ATOL, rtol=0)


def test_sinks_zero_and_a_window_over_the_sequence_equal_dense(rng):
    cfg, params = tiny("test-mqa")
    prompts = random_prompts(rng, [3, 9, 1], cfg.vocab_size)
    dense = jaxkv.generate(params, cfg, prompts, max_new_tokens=12, capacity=64)
    ring = jaxkv.generate(params, cfg, prompts, max_new_tokens=12, cache=Window(64, sinks=0))
    np.testing.assert_array_equal(dense.tokens, ring.tokens)
    ld, _ = jaxkv.prefill(params, cfg, prompts, capacity=64)
    lr, _ = jaxkv.prefill(params, cfg, prompts, cache=Window(64))
    np.testing.assert_array_equal(np.asarray(ld), np.asarray(lr))


def test_hybrid_layers_keep_rings_on_local_layers_and_equal_all_dense(rng):
    """layer_types with local and global layers: local layers get rings of W slots, global
    ones a dense cache; logits equal the all-dense cache and the uncached forward, long past
    W (nothing reads the sequence length from a ring)."""
    cfg, params = tiny_cfg(
        sliding_window=W,
        n_layers=3,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    )
    cache = KVCache.init(cfg, 4, 64)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["RingLayer", "DenseLayer", "RingLayer"]
    assert cache.layers[0].slots == W and cache.layers[1].slots == 64
    steps = 5 * W
    seqs = random_prompts(rng, [p + steps for p in PLENS], cfg.vocab_size)
    ref = reference_logits(params, cfg, seqs)
    for logits, at in _drive(params, cfg, cache, seqs, PLENS, steps):
        for b, t in enumerate(at):
            np.testing.assert_allclose(logits[b], ref[b][t], atol=ATOL, rtol=0)
    prompts = [s[:p] for s, p in zip(seqs, PLENS, strict=True)]
    hybrid = jaxkv.generate(params, cfg, prompts, max_new_tokens=40, capacity=64)
    dense = jaxkv.generate(params, cfg, prompts, max_new_tokens=40, capacity=64, cache=Dense())
    np.testing.assert_array_equal(hybrid.tokens, dense.tokens)


def test_hybrid_memory_ratio():
    """5 local layers (W = 1024) per global layer at 32k tokens: about 5x less K/V."""
    types = ("sliding_attention",) * 5 + ("full_attention",)
    cfg = jaxkv.preset("llama-3m").replace(n_layers=6, sliding_window=1024, layer_types=types)
    hybrid = jaxkv.cache_memory_bytes(cfg, 1, 32768)
    dense = jaxkv.cache_memory_bytes(cfg, 1, 32768, kinds=Dense())
    assert 4.5 < dense / hybrid < 6


# --------------------------------------------------------------------------- stale slots


def _poisoned(cache: KVCache) -> KVCache:
    """The cache with every K/V element NaN (positions untouched)."""
    layers = tuple(
        type(layer)(
            **{
                **vars(layer),
                "k": jnp.full_like(layer.k, jnp.nan),
                "v": jnp.full_like(layer.v, jnp.nan),
            }
        )
        for layer in cache.layers
    )
    return KVCache(layers, cache.positions, cache.lengths, cache.index)


@pytest.mark.parametrize("kind", [None, Window(W), Window(W, sinks=2)])
def test_nan_in_empty_slots_does_not_reach_the_output(rng, kind):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [3, 7], cfg.vocab_size)
    fresh = jaxkv.generate(params, cfg, prompts, max_new_tokens=10, capacity=32, cache=kind)
    cache = _poisoned(KVCache.init(cfg, 2, 32, kinds=kind))
    reused = jaxkv.generate(params, cfg, prompts, max_new_tokens=10, cache=cache)
    np.testing.assert_array_equal(fresh.tokens, reused.tokens)
    logits, c = jaxkv.prefill(
        params, cfg, prompts, cache=_poisoned(KVCache.init(cfg, 2, 32, kinds=kind))
    )
    assert np.isfinite(np.asarray(logits)).all()
    logits, _ = jaxkv.decode_step(params, cfg, c, np.array([1, 2], np.int32))
    assert np.isfinite(np.asarray(logits)).all()


# --------------------------------------------------------------------------- reuse, programs


def test_reused_cache_gives_fresh_results_and_compiles_once(rng):
    cfg, params = tiny("test-gqa")
    cache = KVCache.init(cfg, 2, 64)
    first = random_prompts(rng, [5, 2], cfg.vocab_size)
    second = random_prompts(rng, [9, 4], cfg.vocab_size)
    a = jaxkv.generate(params, cfg, first, max_new_tokens=8, cache=cache)
    with pytest.raises(ValueError, match="donated"):
        jaxkv.generate(params, cfg, first, max_new_tokens=8, cache=cache)
    with count_compiles() as c:
        b = jaxkv.generate(params, cfg, second, max_new_tokens=8, cache=a.state.cache)
    assert c.count == 0
    np.testing.assert_array_equal(
        b.tokens, jaxkv.generate(params, cfg, second, max_new_tokens=8, capacity=64).tokens
    )


def _aliased_params(hlo_text: str) -> set[int]:
    import re

    header = hlo_text.split("\n", 1)[0]
    match = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", header)
    assert match, header[:300]
    return {int(p) for p in re.findall(r":\s*\((\d+),", match.group(1))}


KINDS = {
    "dense": None,
    "ring": Window(256),
    "sinks": Window(252, sinks=4),
    "hybrid": (Window(256), Dense()),
    "h2o": Heavy(150, 50),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_compiled_programs_update_every_kind_in_place(name):
    """For every kind: the donated decode step and the scan loop alias every cache leaf and
    copy no cache-sized buffer; a long generation compiles one program."""
    from jaxkv.bench.common import cache_sized_copies

    cfg, params = tiny("test-gqa")
    kind = KINDS[name]
    res = jaxkv.generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=2, capacity=1024, cache=kind)
    state = res.state
    n_params = len(jax.tree.leaves(params))
    leaves = set(range(n_params, n_params + len(jax.tree.leaves(state.cache))))
    step = (
        decode_step_jit.lower(
            params, state.cache, state.tokens, jnp.ones(2, bool), loop=Loop(config=cfg)
        )
        .compile()
        .as_text()
    )
    assert leaves <= _aliased_params(step)
    loop = Loop(config=cfg, steps=((4, None),))
    scan = (
        resume_jit.lower(params, state, np.zeros(0, np.int32), np.int32(0), None, loop=loop)
        .compile()
        .as_text()
    )
    assert leaves <= _aliased_params(scan)
    for size in {layer.slots for layer in state.cache.layers}:
        assert cache_sized_copies(step, size) == []
        assert cache_sized_copies(scan, size) == []
    with count_compiles() as c:
        jaxkv.generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=600, capacity=1024, cache=kind)
    assert c.count == 1


def test_ring_generation_runs_past_its_size_without_growing(rng):
    """A cache of rings never fills: 16x the ring's size in one call, every row emits every
    token, and the cache's arrays keep their shapes."""
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [3, 30], cfg.vocab_size)
    res = jaxkv.generate(params, cfg, prompts, max_new_tokens=16 * 8, cache=Window(8, sinks=1))
    assert np.asarray(res.lengths).tolist() == [128, 128]
    assert [layer.k.shape[-1] for layer in res.state.cache.layers] == [9, 9]
    assert res.state.cache.room() is None
    more = jaxkv.resume(params, cfg, res.state, max_new_tokens=20)
    assert np.asarray(more.lengths).tolist() == [20, 20]


def test_prefill_needs_no_capacity_when_every_layer_is_a_ring():
    cfg, params = tiny_cfg(sliding_window=W)
    _, cache = jaxkv.prefill(params, cfg, [[1, 2, 3, 4, 5, 6]])
    assert cache.describe() == f"2 x ring(window={W})"
    full, full_params = tiny("test-gqa")
    with pytest.raises(ValueError, match="prefill needs capacity="):
        jaxkv.prefill(full_params, full, [[1, 2]])


@pytest.mark.parametrize("kind", [None, Window(W, sinks=1)])
def test_emptied_slots_hold_zero_values(rng, kind):
    """Whatever empties a slot zeroes its value (a decode step reads V unmasked): reset for
    reuse, and truncate, even over NaN."""
    cfg, params = tiny("test-gqa")
    cache = _poisoned(KVCache.init(cfg, 2, 32, kinds=kind))
    _, cache = jaxkv.prefill(params, cfg, random_prompts(rng, [3, 2], cfg.vocab_size), cache=cache)
    for layer in cache.layers:
        pos = np.asarray(cache.positions if kind is None else layer.pos)
        v = np.asarray(layer.v)  # [B, N, T, H]
        assert (v.transpose(0, 2, 1, 3)[pos < 0] == 0).all()
    rolled = cache.truncate(np.array([1, 2]))
    for layer in rolled.layers:
        pos = np.asarray(rolled.positions if kind is None else layer.pos)
        assert (np.asarray(layer.v).transpose(0, 2, 1, 3)[pos < 0] == 0).all()


@pytest.mark.parametrize("name", list(KINDS))
def test_generate_with_a_cache_writes_into_its_buffers(name):
    """generate(cache=KVCache) empties the cache inside the program and aliases every leaf of
    it to the result: reuse allocates no cache (and copies none)."""
    from jaxkv.bench.common import cache_sized_copies
    from jaxkv.decode import _request
    from jaxkv.loops import generate_jit

    cfg, params = tiny("test-gqa")
    cache = KVCache.init(cfg, 2, 1024, kinds=KINDS[name])
    r = _request(cfg, [[1, 2], [3]], 8, jaxkv.GREEDY, None, 0, 0, None, None, 512, cache, None)
    args = (params, r.tokens, r.positions, r.key, r.eos, r.pad_id, r.cache)
    text = generate_jit.lower(*args, loop=r.loop).compile().as_text()
    first = len(jax.tree.leaves(args[:-1]))
    assert set(range(first, first + len(jax.tree.leaves(cache)))) <= _aliased_params(text)
    if name == "h2o":
        return  # its prefill ranks stored and new tokens and gathers the kept ones (a copy)
    for size in {layer.slots for layer in cache.layers}:
        # A copy of a broadcast is reset's zero fill of the values, written into the buffer.
        copies = [c for c in cache_sized_copies(text, size) if "broadcast" not in c]
        assert copies == []
