"""Generation: greedy against a naive loop over `forward`, continuation, ragged batches,
stopping, streaming, determinism and the compiled-once property."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_compiles, naive_greedy, random_prompts, tiny, tiny_cfg

import jaxkv
from jaxkv.sampling import SamplingConfig

RAGGED = [1, 7, 31, 2, 16]


@pytest.mark.parametrize("kind", ["test-mha", "test-gqa", "test-mqa"])
def test_greedy_generate_equals_naive_argmax_loop(kind, rng):
    cfg, params = tiny(kind)
    prompts = random_prompts(rng, [5, 12, 1], cfg.vocab_size)
    res = jaxkv.generate(params, cfg, prompts, max_new_tokens=8)
    assert res.tokens.shape == (3, 8)
    np.testing.assert_array_equal(np.asarray(res.lengths), [8, 8, 8])
    for b, p in enumerate(prompts):
        assert np.asarray(res.tokens[b]).tolist() == naive_greedy(params, cfg, p, 8)


def test_ragged_batch_rows_equal_rows_alone(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, RAGGED, cfg.vocab_size)
    sampling = SamplingConfig(temperature=0.9, top_k=20)
    # Greedy: each row equals the row run alone.
    batch = jaxkv.generate(params, cfg, prompts, max_new_tokens=6)
    for b, p in enumerate(prompts):
        alone = jaxkv.generate(params, cfg, [p], max_new_tokens=6)
        np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
    # Sampling draws per row from one key, so compare a batch against the same batch with the
    # other rows' prompts replaced: a row's tokens must not depend on its neighbours.
    res1 = jaxkv.generate(params, cfg, prompts, max_new_tokens=6, sampling=sampling, key=7)
    other = [p if b == 2 else [3] * len(p) for b, p in enumerate(prompts)]
    res2 = jaxkv.generate(params, cfg, other, max_new_tokens=6, sampling=sampling, key=7)
    np.testing.assert_array_equal(res1.tokens[2], res2.tokens[2])


@pytest.mark.parametrize("sampling", [jaxkv.GREEDY, SamplingConfig(temperature=1.0, top_p=0.9)])
def test_generate_then_resume_equals_one_call(sampling, rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [4, 9], cfg.vocab_size)
    kw = dict(sampling=sampling, key=11, capacity=40)
    four = jaxkv.generate(params, cfg, prompts, max_new_tokens=4, **kw)
    three = jaxkv.generate(params, cfg, prompts, max_new_tokens=3, **kw)
    one = jaxkv.resume(params, cfg, three.state, max_new_tokens=1, sampling=sampling)
    got = np.concatenate([three.tokens, one.tokens], axis=1)
    np.testing.assert_array_equal(got, four.tokens)
    np.testing.assert_array_equal(one.state.cache.lengths, four.state.cache.lengths)
    np.testing.assert_allclose(one.state.cache.layers[1].k, four.state.cache.layers[1].k)


def test_eos_stops_row_emits_pad_and_freezes_cache(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [6, 3], cfg.vocab_size)
    free = jaxkv.generate(params, cfg, prompts, max_new_tokens=10)
    eos = int(free.tokens[0, 2])  # row 0 emits this at step 2
    first_hit = [
        int(np.argmax(np.asarray(free.tokens[b]) == eos)) if eos in free.tokens[b] else None
        for b in range(2)
    ]
    res = jaxkv.generate(params, cfg, prompts, max_new_tokens=10, eos_ids=[96, eos], pad_id=5)
    for b in range(2):
        toks = np.asarray(res.tokens[b])
        hit = first_hit[b]
        if hit is None:
            np.testing.assert_array_equal(toks, free.tokens[b])
            assert int(res.lengths[b]) == 10
        else:
            np.testing.assert_array_equal(toks[: hit + 1], np.asarray(free.tokens[b])[: hit + 1])
            assert (toks[hit + 1 :] == 5).all()
            assert int(res.lengths[b]) == hit + 1
    assert bool(res.state.done[0])
    # The stopped row stored exactly its prompt and the tokens it fed before stopping.
    assert int(res.state.cache.lengths[0]) == 6 + first_hit[0]
    # Resuming does not restart a stopped row, and its cache stays as it was.
    before = np.asarray(res.state.cache.layers[0].k[0])
    more = jaxkv.resume(params, cfg, res.state, max_new_tokens=3, eos_ids=[96, eos], pad_id=5)
    assert (np.asarray(more.tokens[0]) == 5).all()
    np.testing.assert_array_equal(np.asarray(more.state.cache.layers[0].k[0]), before)


def test_all_rows_stop_early_outputs_only_pad_and_no_nan(rng):
    cfg, params = tiny("test-mha")
    prompts = random_prompts(rng, [3, 3], cfg.vocab_size)
    greedy = jaxkv.generate(params, cfg, prompts, max_new_tokens=2)
    eos = [int(greedy.tokens[0, 0]), int(greedy.tokens[1, 0])]
    res = jaxkv.generate(params, cfg, prompts, max_new_tokens=6, eos_ids=eos, pad_id=1)
    np.testing.assert_array_equal(res.lengths, [1, 1])
    assert (np.asarray(res.tokens[:, 1:]) == 1).all()
    for leaf in jax.tree.leaves(res.state.cache):
        assert not np.isnan(np.asarray(leaf, dtype=np.float64)).any()


def test_row_reaching_capacity_is_marked_done_not_overwritten(rng):
    cfg, params = tiny("test-gqa")
    logits, cache = jaxkv.prefill(
        params, cfg, random_prompts(rng, [6, 2], cfg.vocab_size), capacity=8
    )
    for _ in range(2):  # fills slots 6 and 7
        logits, cache = jaxkv.decode_step(params, cfg, cache, jnp.argmax(logits, -1))
    assert int(cache.index) == 8
    full_k = np.asarray(cache.layers[0].k)
    lengths = np.asarray(cache.lengths)
    logits, cache = jaxkv.decode_step(params, cfg, cache, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(np.asarray(cache.layers[0].k), full_k)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    assert int(cache.index) == 8
    assert np.isfinite(np.asarray(logits)).all()
    # Inside a compiled loop the same situation marks the rows done.
    state = jaxkv.DecodeState(
        cache=cache,
        tokens=jnp.array([1, 2], jnp.int32),
        done=jnp.zeros(2, bool),
        key=jax.random.key(0),
    )
    from jaxkv.loops import Loop, resume_jit

    state, toks, ok, _ = resume_jit(
        params,
        state,
        jnp.zeros(0, jnp.int32),
        jnp.int32(0),
        None,
        loop=Loop(config=cfg, sampling=jaxkv.GREEDY, steps=((2, 8),)),
    )
    assert np.asarray(state.done).all()
    assert not np.asarray(ok).any()
    np.testing.assert_array_equal(np.asarray(toks), 0)


def test_stream_equals_generate(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [5, 2, 9], cfg.vocab_size)
    kw = dict(max_new_tokens=11, sampling=SamplingConfig(temperature=0.8, min_p=0.05), key=3)
    ref = jaxkv.generate(params, cfg, prompts, **kw)
    chunks = list(jaxkv.generate_stream(params, cfg, prompts, chunk_size=4, **kw))
    assert [c.shape[1] for c in chunks] == [1, 4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), ref.tokens)


def test_stream_stops_when_every_row_is_done(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [4, 4], cfg.vocab_size)
    ref = jaxkv.generate(params, cfg, prompts, max_new_tokens=30)
    # Pick EOS ids that both rows hit within the first few tokens.
    eos = [int(ref.tokens[0, 1]), int(ref.tokens[1, 2])]
    full = jaxkv.generate(params, cfg, prompts, max_new_tokens=30, eos_ids=eos)
    chunks = list(
        jaxkv.generate_stream(params, cfg, prompts, max_new_tokens=30, eos_ids=eos, chunk_size=4)
    )
    got = np.concatenate(chunks, axis=1)
    assert got.shape[1] == 5  # first token + one chunk; then every row is done
    np.testing.assert_array_equal(got, np.asarray(full.tokens)[:, :5])
    assert (np.asarray(full.tokens)[:, 5:] == 0).all()


def test_sampling_determinism_and_top_k_one_is_greedy(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [5, 8], cfg.vocab_size)
    s = SamplingConfig(temperature=1.5)
    a = jaxkv.generate(params, cfg, prompts, max_new_tokens=12, sampling=s, key=1)
    b = jaxkv.generate(params, cfg, prompts, max_new_tokens=12, sampling=s, key=1)
    c = jaxkv.generate(params, cfg, prompts, max_new_tokens=12, sampling=s, key=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = jaxkv.generate(params, cfg, prompts, max_new_tokens=12)
    top1 = jaxkv.generate(
        params,
        cfg,
        prompts,
        max_new_tokens=12,
        sampling=SamplingConfig(temperature=1.5, top_k=1),
        key=9,
    )
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    # Sampling splits the key once per draw (12 here); greedy draws nothing and keeps it.
    key_data = lambda k: np.asarray(jax.random.key_data(k))
    want = jax.random.key(1)
    for _ in range(12):
        want, _ = jax.random.split(want)
    np.testing.assert_array_equal(key_data(a.state.key), key_data(want))
    np.testing.assert_array_equal(key_data(greedy.state.key), key_data(jax.random.key(0)))


def test_generate_compiles_once_per_bucket(rng):
    # A config no other test uses, so the counts are not affected by earlier compiles.
    cfg, params = tiny_cfg(d_model=48, ffn_dim=80, seed=5)
    sampling = SamplingConfig(temperature=0.7)
    with count_compiles() as first:
        jaxkv.generate(
            params,
            cfg,
            random_prompts(rng, [9, 3], cfg.vocab_size),
            max_new_tokens=5,
            sampling=sampling,
        )
    assert first.count >= 1
    with count_compiles() as second:
        # Other lengths in the same bucket (16), other tokens, another key.
        res = jaxkv.generate(
            params,
            cfg,
            random_prompts(rng, [14, 16], cfg.vocab_size),
            max_new_tokens=5,
            sampling=sampling,
            key=4,
        )
        res.tokens.block_until_ready()
    assert second.count == 0
    with count_compiles() as third:  # a new bucket compiles again
        jaxkv.generate(
            params,
            cfg,
            random_prompts(rng, [17, 3], cfg.vocab_size),
            max_new_tokens=5,
            sampling=sampling,
        )
    assert third.count >= 1


def test_decode_step_traced_once_per_generation(rng, monkeypatch):
    from jaxkv import loops as gen

    cfg, params = tiny_cfg(d_model=40, ffn_dim=72, seed=6)
    traces = []
    original = gen._step

    def counting_step(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gen, "_step", counting_step)
    jaxkv.generate(params, cfg, random_prompts(rng, [4], cfg.vocab_size), max_new_tokens=20)
    assert len(traces) == 1  # 19 steps, one trace: the step is the body of a lax.scan
    jaxkv.generate(params, cfg, random_prompts(rng, [6], cfg.vocab_size), max_new_tokens=20)
    assert len(traces) == 1  # same bucket: nothing traced again


def test_decode_step_donates_and_reuses_cache_buffers(rng):
    cfg, params = tiny("test-gqa")
    logits, cache = jaxkv.prefill(
        params, cfg, random_prompts(rng, [3, 5], cfg.vocab_size), capacity=32
    )
    logits, cache = jaxkv.decode_step(params, cfg, cache, jnp.argmax(logits, -1))
    old = cache
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(cache.layers)]
    logits, cache = jaxkv.decode_step(params, cfg, cache, jnp.argmax(logits, -1))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.layers))
    assert [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(cache.layers)] == pointers
