"""Properties of the compiled decode program: the attention span does not change results,
and every cache leaf is donated and aliased from input to output (no hidden copies)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from helpers import ATOL, random_prompts, tiny

import jaxkv
from jaxkv.loops import Loop, decode_step_jit, resume_jit
from jaxkv.prefill import attention_span


def _aliased_params(hlo_text: str) -> set[int]:
    """Entry parameters that the compiled module aliases to an output."""
    header = hlo_text.split("\n", 1)[0]
    match = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", header)
    assert match, header[:300]
    return {int(p) for p in re.findall(r":\s*\((\d+),", match.group(1))}


def test_decode_step_aliases_every_cache_leaf():
    cfg, params = tiny("test-gqa")
    cache = jaxkv.KVCache.init(cfg, 2, 64)
    args = (params, cache, jnp.zeros(2, jnp.int32), jnp.ones(2, bool))
    text = decode_step_jit.lower(*args, loop=Loop(config=cfg)).compile().as_text()
    n_params = len(jax.tree.leaves(params))
    cache_params = set(range(n_params, n_params + len(jax.tree.leaves(cache))))
    assert cache_params <= _aliased_params(text)


def test_scan_loop_aliases_every_state_leaf():
    cfg, params = tiny("test-gqa")
    res = jaxkv.generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=2, capacity=64)
    state = res.state
    eos, pad = np.zeros(0, np.int32), np.int32(0)
    loop = Loop(config=cfg, sampling=jaxkv.GREEDY, steps=((4, 64),))
    lowered = resume_jit.lower(params, state, eos, pad, None, loop=loop)
    text = lowered.compile().as_text()
    n_params = len(jax.tree.leaves(params))
    state_leaves = [x for x in jax.tree.leaves(state)]
    cache_leaves = len(jax.tree.leaves(state.cache))
    wanted = set(range(n_params, n_params + cache_leaves))
    assert len(state_leaves) > cache_leaves
    assert wanted <= _aliased_params(text)


def test_span_gives_the_same_logits_as_full_capacity(rng):
    cfg, params = tiny("test-mqa")
    prompts = random_prompts(rng, [1, 7, 31, 2, 16], cfg.vocab_size)
    fed = rng.integers(0, cfg.vocab_size, size=(5, 4)).astype(np.int32)
    _, full = jaxkv.prefill(params, cfg, prompts, capacity=512)
    _, short = jaxkv.prefill(params, cfg, prompts, capacity=512)
    for t in range(4):
        lf, full = jaxkv.decode_step(params, cfg, full, fed[:, t])
        ls, short = jaxkv.decode_step(params, cfg, short, fed[:, t], span=128)
        np.testing.assert_allclose(lf, ls, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(full.positions, short.positions)


def test_generate_does_not_depend_on_capacity(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [3, 12], cfg.vocab_size)
    small = jaxkv.generate(params, cfg, prompts, max_new_tokens=20)
    big = jaxkv.generate(params, cfg, prompts, max_new_tokens=20, capacity=4096)
    np.testing.assert_array_equal(small.tokens, big.tokens)
    assert attention_span(16 + 20, 4096) == 128  # the big cache is attended over 128 slots


def test_attention_span_rounding():
    assert attention_span(1, 4096) == 128
    assert attention_span(128, 4096) == 128
    assert attention_span(129, 4096) == 256
    assert attention_span(300, 200) == 200
    # For extend and chat: 128 times a power of two, so a growing conversation compiles few.
    assert attention_span(300, 8192) == 384
    assert [attention_span(n, 8192, True) for n in (1, 129, 300, 513, 1500)] == [
        128,
        256,
        512,
        1024,
        2048,
    ]
    # On CPU a span over half the capacity reads the whole cache (no copy of a prefix); on an
    # accelerator the span stays rounded.
    assert attention_span(1000, 2048) == 1024
    assert attention_span(1100, 2048) == (2048 if jax.default_backend() == "cpu" else 1152)


def test_benchmark_layout_variants_compute_the_same_step(rng):
    """The layouts BENCHMARKS.md compares (layers under lax.scan over a stacked cache,
    unrolled layers over a stacked cache, a token-major cache) give the library's logits and
    cache contents."""
    from jaxkv.bench import variants

    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [5, 9], cfg.vocab_size)
    tokens = jnp.array([3, 4], jnp.int32)
    _, ref_cache = jaxkv.prefill(params, cfg, prompts, capacity=64)
    ref_logits, ref_cache = jaxkv.decode_step(params, cfg, ref_cache, tokens)
    for scan in (True, False):
        _, cache = jaxkv.prefill(params, cfg, prompts, capacity=64)
        p = variants.stack_params(params, cfg) if scan else params
        logits, cache = variants.decode_step_stacked(
            p, variants.stack_cache(cache), tokens, config=cfg, span=64, scan=scan
        )
        np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
        np.testing.assert_allclose(cache.layers[0].k[1], ref_cache.layers[1].k, atol=1e-6)
        np.testing.assert_allclose(cache.layers[0].v[1], ref_cache.layers[1].v, atol=1e-6)
        np.testing.assert_array_equal(cache.lengths, ref_cache.lengths)
    _, cache = jaxkv.prefill(params, cfg, prompts, capacity=64)
    logits, cache = decode_step_jit(
        params,
        variants.token_major_cache(cache),
        tokens,
        jnp.ones(2, bool),
        loop=Loop(config=cfg, span=64),
    )
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
    want = variants.token_major_cache(ref_cache)
    for got, ref in zip(cache.layers, want.layers, strict=True):
        np.testing.assert_allclose(got.k, ref.k, atol=1e-6)
        np.testing.assert_allclose(got.v, ref.v, atol=1e-6)


def test_no_copy_of_the_cache_in_decode_step_or_scan():
    """The cache is updated in place: neither the donated decode step nor the generation
    loop copies a cache-sized buffer (see the in-place note in jaxkv/cache.py)."""
    from jaxkv.bench.common import cache_sized_copies, synthetic_state

    cfg, params = tiny("test-gqa")
    state = synthetic_state(cfg, 2, 16, 4096)
    step = (
        decode_step_jit.lower(
            params, state.cache, state.tokens, jnp.ones(2, bool), loop=Loop(config=cfg, span=128)
        )
        .compile()
        .as_text()
    )
    assert cache_sized_copies(step, 4096) == []
    loop = (
        resume_jit.lower(
            params,
            state,
            np.zeros(0, np.int32),
            np.int32(0),
            None,
            loop=Loop(config=cfg, sampling=jaxkv.GREEDY, steps=((4, 128),)),
        )
        .compile()
        .as_text()
    )
    assert cache_sized_copies(loop, 4096) == []
