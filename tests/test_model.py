"""The cached paths against the uncached reference `forward`, and the model's pieces against
independent NumPy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ATOL, random_prompts, reference_logits, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxkv
from jaxkv import model
from jaxkv.decode import _layout
from jaxkv.layers import apply_rope

KINDS = ["test-mha", "test-gqa", "test-mqa"]
RAGGED = [1, 7, 31, 2, 16]


@functools.partial(jax.jit, static_argnums=4)
def _prefill_all(params, tokens, positions, cache, cfg):
    return model.apply(params, cfg, tokens, positions, cache, span=0)


def _cached_logits(params, cfg, prompts, fed, capacity=64):
    """Logits at every prompt position (prefill) and after each fed token (decode_step)."""
    batch = _layout([np.asarray(p) for p in prompts], capacity, pad_id=0)
    cache = jaxkv.KVCache.init(cfg, len(prompts), capacity)
    logits, cache = _prefill_all(
        params, jnp.asarray(batch.tokens), jnp.asarray(batch.positions), cache, cfg
    )
    prompt_logits = []
    for b, p in enumerate(prompts):
        start = batch.longest - len(p)
        prompt_logits.append(np.asarray(logits[b, start : batch.longest]))
    step_logits = []
    for t in range(fed.shape[1]):
        lg, cache = jaxkv.decode_step(params, cfg, cache, fed[:, t])
        step_logits.append(np.asarray(lg))
    return prompt_logits, np.stack(step_logits, axis=1), cache


@pytest.mark.parametrize("kind", KINDS)
def test_cached_equals_uncached_every_position(kind, rng):
    cfg, params = tiny(kind)
    prompts = random_prompts(rng, RAGGED, cfg.vocab_size)
    fed = rng.integers(0, cfg.vocab_size, size=(len(prompts), 6)).astype(np.int32)
    prompt_logits, step_logits, cache = _cached_logits(params, cfg, prompts, fed)
    refs = reference_logits(params, cfg, [p + fed[b].tolist() for b, p in enumerate(prompts)])
    for b, p in enumerate(prompts):
        full = refs[b]
        np.testing.assert_allclose(prompt_logits[b], full[: len(p)], atol=ATOL, rtol=0)
        np.testing.assert_allclose(step_logits[b], full[len(p) :], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [n + 6 for n in RAGGED])
    assert int(cache.index) == max(RAGGED) + 6


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_returns_last_prompt_logits(kind, rng):
    cfg, params = tiny(kind)
    prompts = random_prompts(rng, RAGGED, cfg.vocab_size)
    logits, cache = jaxkv.prefill(params, cfg, prompts, capacity=48)
    assert logits.shape == (len(prompts), cfg.vocab_size)
    for b, ref in enumerate(reference_logits(params, cfg, prompts)):
        np.testing.assert_allclose(logits[b], ref[-1], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), RAGGED)
    # Padding never enters the cache as a valid slot.
    assert int((np.asarray(cache.positions) >= 0).sum()) == sum(RAGGED)


def test_row_independent_of_other_rows_and_padding(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, RAGGED, cfg.vocab_size)
    fed = rng.integers(0, cfg.vocab_size, size=(len(prompts), 4)).astype(np.int32)
    batch_p, batch_s, _ = _cached_logits(params, cfg, prompts, fed)
    for b, p in enumerate(prompts):
        alone_p, alone_s, _ = _cached_logits(params, cfg, [p], fed[b : b + 1])
        np.testing.assert_allclose(batch_p[b], alone_p[0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(batch_s[b], alone_s[0], atol=ATOL, rtol=0)


def test_sliding_window_matches_masked_reference(rng):
    cfg = jaxkv.preset("test-gqa").replace(sliding_window=5)
    params = jaxkv.init_params(cfg, jax.random.key(3))
    prompts = random_prompts(rng, [9, 3], cfg.vocab_size)
    fed = rng.integers(0, cfg.vocab_size, size=(2, 5)).astype(np.int32)
    prompt_logits, step_logits, _ = _cached_logits(params, cfg, prompts, fed)
    wide = cfg.replace(sliding_window=None)
    for b, p in enumerate(prompts):
        seq = p + fed[b].tolist()
        full = np.asarray(jaxkv.forward(params, cfg, [seq]))[0]
        np.testing.assert_allclose(step_logits[b], full[len(p) :], atol=ATOL, rtol=0)
        np.testing.assert_allclose(prompt_logits[b], full[: len(p)], atol=ATOL, rtol=0)
        # The window really restricts attention once the sequence is longer than it.
        unwindowed = np.asarray(jaxkv.forward(params, wide, [seq]))[0]
        assert np.abs(full[6:] - unwindowed[6:]).max() > 1e-4
        np.testing.assert_allclose(full[:5], unwindowed[:5], atol=ATOL, rtol=0)


@settings(max_examples=6, deadline=None)
@given(
    n_kv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([8, 16]),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    n_fed=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_cached_equals_uncached_random_configs(n_kv, group, head_dim, lengths, n_fed, seed):
    cfg = jaxkv.ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=n_kv * group,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=48,
    )
    params = jaxkv.init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    prompts = random_prompts(rng, lengths, cfg.vocab_size)
    fed = rng.integers(0, cfg.vocab_size, size=(len(prompts), n_fed)).astype(np.int32)
    prompt_logits, step_logits, _ = _cached_logits(params, cfg, prompts, fed, capacity=32)
    refs = reference_logits(params, cfg, [p + fed[b].tolist() for b, p in enumerate(prompts)])
    for b, p in enumerate(prompts):
        full = refs[b]
        np.testing.assert_allclose(prompt_logits[b], full[: len(p)], atol=ATOL, rtol=0)
        np.testing.assert_allclose(step_logits[b], full[len(p) :], atol=ATOL, rtol=0)


def _numpy_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Independent split-half RoPE: pair dimension i with i + d/2, rotate by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            for i in range(d // 2):
                angle = positions[b, s] * theta ** (-2.0 * i / d)
                c, sn = np.cos(angle), np.sin(angle)
                a, bb = x[b, s, ..., i], x[b, s, ..., i + d // 2]
                out[b, s, ..., i] = a * c - bb * sn
                out[b, s, ..., i + d // 2] = bb * c + a * sn
    return out


def test_rope_split_half_against_numpy(rng):
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 100, 2047, 5, 9]])
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0))
    np.testing.assert_allclose(got, _numpy_rope(x, positions, 10000.0), atol=2e-5)
    # Position 0 is the identity, and the rotation preserves each pair's norm.
    np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_relative_position_property(rng):
    """q.k after RoPE depends only on the distance between positions."""
    q = jnp.asarray(rng.standard_normal((1, 1, 16)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((1, 1, 16)).astype(np.float32))

    def dot(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), 500.0)
        rk = apply_rope(k, jnp.array([[pk]]), 500.0)
        return float(jnp.sum(rq * rk))

    assert dot(10, 3) == pytest.approx(dot(107, 100), abs=1e-4)
    assert dot(10, 3) != pytest.approx(dot(10, 4), abs=1e-4)


def test_param_count_matches_tree():
    for name in ["test-mha", "test-gqa", "test-mqa"]:
        cfg, params = tiny(name)
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        assert n == cfg.param_count()
    cfg = jaxkv.preset("test-gqa").replace(
        norm="layer",
        mlp="gelu",
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        max_seq_len=64,
    )
    params = jaxkv.init_params(cfg, jax.random.key(0))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == cfg.param_count()


def test_padded_batch_forward_equals_rows_alone(rng):
    """The premise of helpers.reference_logits: right padding does not change a row."""
    cfg, params = tiny("test-gqa")
    seqs = random_prompts(rng, [3, 11, 1], cfg.vocab_size)
    padded = reference_logits(params, cfg, seqs, pad_to=16)
    for s, got in zip(seqs, padded, strict=True):
        np.testing.assert_allclose(got, jaxkv.forward(params, cfg, [s])[0], atol=ATOL, rtol=0)


def test_forward_never_nan_on_padding(rng):
    cfg, params = tiny("test-gqa")
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 6))
    positions = np.array([[-1, -1, -1, 0, 1, 2], [-1, -1, -1, -1, -1, -1]])
    logits = jaxkv.forward(params, cfg, tokens, positions)
    assert np.isfinite(np.asarray(logits)).all()
    ref = jaxkv.forward(params, cfg, [tokens[0, 3:].tolist()])
    np.testing.assert_allclose(logits[0, 3:], ref[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("by_reduction", [True, False])
def test_both_decode_attention_forms_match_uncached(by_reduction, rng, monkeypatch):
    """Decode attention runs as multiply-reduce on GPU/TPU and as dots on CPU; both forms are
    checked here on CPU (a config of its own, so nothing compiled earlier is reused)."""
    from jaxkv import attention

    monkeypatch.setattr(attention, "DECODE_BY_REDUCTION", by_reduction)
    cfg = jaxkv.preset("test-gqa").replace(norm_eps=1e-5 * (2.0 if by_reduction else 3.0))
    params = jaxkv.init_params(cfg, jax.random.key(5))
    prompts = random_prompts(rng, RAGGED, cfg.vocab_size)
    fed = rng.integers(0, cfg.vocab_size, size=(len(prompts), 3)).astype(np.int32)
    _, step_logits, _ = _cached_logits(params, cfg, prompts, fed)
    refs = reference_logits(params, cfg, [p + fed[b].tolist() for b, p in enumerate(prompts)])
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(step_logits[b], refs[b][len(p) :], atol=ATOL, rtol=0)
