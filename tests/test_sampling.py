"""Sampling filters and the sampler, on hand-made logits (no model needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxkv.sampling import (
    GREEDY,
    SamplingConfig,
    greedy,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = jnp.log(jnp.asarray(PROBS))[None]


def _kept(filtered):
    return np.isfinite(np.asarray(filtered))[0].tolist()


def test_top_k_keeps_the_k_largest():
    x = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert _kept(top_k_filter(x, 2)) == [False, True, False, True, False]
    assert _kept(top_k_filter(x, 5)) == [True] * 5


def test_top_p_keeps_smallest_set_reaching_p():
    assert _kept(top_p_filter(LOGITS, 0.5)) == [True, False, False, False]
    assert _kept(top_p_filter(LOGITS, 0.8)) == [True, True, False, False]
    assert _kept(top_p_filter(LOGITS, 0.81)) == [True, True, True, False]
    assert _kept(top_p_filter(LOGITS, 0.01)) == [True, False, False, False]
    assert _kept(top_p_filter(LOGITS, 1.0)) == [True] * 4


def test_min_p_keeps_tokens_above_fraction_of_top():
    # 0.5 * 0.5 = 0.25: keeps 0.5 and 0.3.
    assert _kept(min_p_filter(LOGITS, 0.5)) == [True, True, False, False]
    assert _kept(min_p_filter(LOGITS, 0.2)) == [True, True, True, False]


def _frequencies(logits, config, n=20000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    draws = jax.vmap(lambda k: sample(logits, k, config))(keys)[:, 0]
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_follows_tempered_softmax(temperature):
    freq = _frequencies(LOGITS, SamplingConfig(temperature=temperature))
    expected = np.asarray(jax.nn.softmax(LOGITS[0] / temperature))
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_filters_apply_after_temperature_in_documented_order():
    # At T=1, top_p=0.6 keeps tokens 0 and 1 (0.5 < 0.6). At T=4 the distribution flattens
    # and the nucleus grows to three tokens: top-p sees tempered probabilities.
    freq_t1 = _frequencies(LOGITS, SamplingConfig(temperature=1.0, top_p=0.6))
    freq_t4 = _frequencies(LOGITS, SamplingConfig(temperature=4.0, top_p=0.6))
    assert freq_t1[2] == 0 and freq_t1[3] == 0
    np.testing.assert_allclose(freq_t1[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.015)
    assert freq_t4[2] > 0.2 and freq_t4[3] == 0
    # top-k before top-p: k=3 removes token 3, then top-p over the renormalised three.
    freq = _frequencies(LOGITS, SamplingConfig(temperature=1.0, top_k=3, top_p=0.9))
    assert freq[3] == 0 and freq[2] > 0


def test_greedy_and_top_k_one_agree():
    logits = jax.random.normal(jax.random.key(0), (8, 50))
    key = jax.random.key(1)
    np.testing.assert_array_equal(sample(logits, key, GREEDY), greedy(logits))
    np.testing.assert_array_equal(sample(logits, key, SamplingConfig(top_k=1)), greedy(logits))


def test_same_key_same_sample_and_keys_differ():
    logits = jnp.zeros((4, 1000))
    c = SamplingConfig(temperature=1.0)
    a = sample(logits, jax.random.key(5), c)
    np.testing.assert_array_equal(a, sample(logits, jax.random.key(5), c))
    assert not np.array_equal(a, sample(logits, jax.random.key(6), c))


@settings(max_examples=50, deadline=None)
@given(
    logits=hnp.arrays(
        np.float32, (1, 12), elements=st.floats(-8, 8, width=32, allow_subnormal=False)
    ),
    p=st.floats(0.05, 1.0),
)
def test_top_p_set_is_minimal_and_reaches_p(logits, p):
    kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p)))[0]
    z = logits[0].astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert kept[np.argmax(logits[0])]
    assert probs[kept].sum() >= min(p, 1.0) - 1e-5
    # Removing the least likely kept token drops below p (unless only ties remain).
    lowest = probs[kept].min()
    if kept.sum() > 1 and (probs[kept] == lowest).sum() == 1:
        assert probs[kept].sum() - lowest < p + 1e-5


@settings(max_examples=30, deadline=None)
@given(
    logits=hnp.arrays(
        np.float32, (2, 9), elements=st.floats(-5, 5, width=32, allow_subnormal=False)
    ),
    seed=st.integers(0, 1000),
)
def test_sample_always_returns_a_kept_token(logits, seed):
    # (No subnormal logits: XLA on CPU flushes them to zero, numpy does not.)
    c = SamplingConfig(temperature=0.7, top_k=3, top_p=0.5, min_p=0.1)
    tok = np.asarray(sample(jnp.asarray(logits), jax.random.key(seed), c))
    for b in range(2):
        top3 = np.sort(logits[b])[-3]
        assert logits[b, tok[b]] >= top3
