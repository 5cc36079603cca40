"""Bad input raises a clear error before anything is traced or compiled."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_compiles, tiny

import jaxkv
from jaxkv.sampling import SamplingConfig


@pytest.fixture(scope="module")
def model():
    return tiny("test-gqa")


def _raises(exc, match, fn, *args, **kwargs):
    """fn raises exc matching `match`, and compiles nothing on the way."""
    with count_compiles() as c, pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert c.count == 0


def test_prompt_plus_new_tokens_over_capacity(model):
    cfg, params = model
    _raises(
        ValueError,
        re.escape("prompt length 10 + max_new_tokens 7 = 17 exceeds the cache capacity 16"),
        jaxkv.generate,
        params,
        cfg,
        [[1] * 10, [2] * 3],
        max_new_tokens=7,
        capacity=16,
    )
    _raises(
        ValueError,
        "prompt length 10 .* capacity 8",
        jaxkv.prefill,
        params,
        cfg,
        [[1] * 10],
        capacity=8,
    )


def test_learned_positions_bound_by_max_seq_len():
    cfg = jaxkv.preset("test-gqa").replace(position="learned", max_seq_len=12)
    params = jaxkv.init_params(cfg, jaxkv.model.jax.random.key(0))
    _raises(ValueError, "max_seq_len 12", jaxkv.generate, params, cfg, [[1] * 10], max_new_tokens=3)


def test_empty_prompt(model):
    cfg, params = model
    _raises(
        ValueError, "prompt 1 is empty", jaxkv.generate, params, cfg, [[1, 2], []], max_new_tokens=2
    )
    _raises(ValueError, "batch is empty", jaxkv.generate, params, cfg, [], max_new_tokens=2)


def test_token_outside_vocab(model):
    cfg, params = model
    _raises(
        ValueError,
        r"prompt 0 has token id 97 outside the vocabulary \[0, 97\)",
        jaxkv.generate,
        params,
        cfg,
        [[1, 97]],
        max_new_tokens=2,
    )
    _raises(ValueError, "token id -3", jaxkv.generate, params, cfg, [[1], [-3]], max_new_tokens=2)
    _raises(
        ValueError,
        "eos id=200",
        jaxkv.generate,
        params,
        cfg,
        [[1]],
        max_new_tokens=2,
        eos_ids=[200],
    )
    _raises(
        ValueError, "pad_id=-1", jaxkv.generate, params, cfg, [[1]], max_new_tokens=2, pad_id=-1
    )


@pytest.mark.parametrize(
    "prompts", [[[1.0, 2.0]], [[1, 2.5]], [["a", "b"]], [[True, 2]], np.ones((1, 3), np.float32)]
)
def test_non_integer_tokens(model, prompts):
    cfg, params = model
    _raises(TypeError, "non-integer tokens", jaxkv.generate, params, cfg, prompts, max_new_tokens=2)


def test_string_prompt(model):
    cfg, params = model
    _raises(
        TypeError, "encode it to token ids", jaxkv.generate, params, cfg, "hello", max_new_tokens=2
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.5), "temperature must be a number >= 0, got -0.5"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-1), "top_k must be None or an int >= 0, got -1"),
        (dict(min_p=1.0), r"min_p must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("n,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError)])
def test_max_new_tokens_below_one(model, n, exc):
    cfg, params = model
    _raises(exc, "max_new_tokens must be", jaxkv.generate, params, cfg, [[1, 2]], max_new_tokens=n)


def test_cache_for_another_config_or_batch(model):
    cfg, params = model
    other = jaxkv.preset("test-mha")  # 4 KV heads instead of 2
    cache = jaxkv.KVCache.init(other, 2, 16)
    _raises(ValueError, r"n_kv_heads=2", jaxkv.decode_step, params, cfg, cache, jnp.array([1, 2]))
    deeper = cfg.replace(n_layers=3)
    _raises(
        ValueError,
        "cache has 3 layers but the config has n_layers=2",
        jaxkv.decode_step,
        params,
        cfg,
        jaxkv.KVCache.init(deeper, 2, 16),
        jnp.array([1, 2]),
    )
    cache = jaxkv.KVCache.init(cfg, 2, 16)
    _raises(
        ValueError,
        r"tokens must be int \[2\]",
        jaxkv.decode_step,
        params,
        cfg,
        cache,
        jnp.array([1, 2, 3]),
    )
    res = jaxkv.generate(params, cfg, [[1, 2]], max_new_tokens=2, capacity=8)
    _raises(
        ValueError,
        "cache has 2 layers but the config has n_layers=3",
        jaxkv.resume,
        params,
        deeper,
        res.state,
        max_new_tokens=1,
    )


def test_resume_past_capacity(model):
    cfg, params = model
    res = jaxkv.generate(params, cfg, [[1, 2, 3]], max_new_tokens=3, capacity=8)
    _raises(
        ValueError,
        "cache holds 5 of 8 slots; 4 more tokens need 9",
        jaxkv.resume,
        params,
        cfg,
        res.state,
        max_new_tokens=4,
    )


def test_span_must_cover_written_slot(model):
    cfg, params = model
    _, cache = jaxkv.prefill(params, cfg, [[1] * 5], capacity=32)
    _raises(
        ValueError,
        r"span 4 must cover the slot being written \(5\)",
        jaxkv.decode_step,
        params,
        cfg,
        cache,
        jnp.array([1]),
        span=4,
    )


def test_bad_config_values():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        jaxkv.ModelConfig(vocab_size=10, d_model=48, n_layers=1, n_heads=6, n_kv_heads=4, ffn_dim=8)
    with pytest.raises(ValueError, match="d_model=50 is not divisible by n_heads=4"):
        jaxkv.ModelConfig(vocab_size=10, d_model=50, n_layers=1, n_heads=4, ffn_dim=8)
    with pytest.raises(ValueError, match="unknown preset"):
        jaxkv.preset("nope")


def _layered(**changes):
    base = dict(vocab_size=10, d_model=16, n_layers=3, n_heads=2, ffn_dim=8, sliding_window=4)
    return jaxkv.ModelConfig(**{**base, **changes})


def test_bad_layer_types():
    full, slide = "full_attention", "sliding_attention"
    with pytest.raises(ValueError, match="layer_types has 2 entries but n_layers=3"):
        _layered(layer_types=(full, slide))
    with pytest.raises(ValueError, match=r"layer_types has \['chunked_attention'\]; each must be"):
        _layered(layer_types=(full, "chunked_attention", slide))
    with pytest.raises(ValueError, match="sliding_attention layers but no sliding_window"):
        _layered(layer_types=(full, slide, full), sliding_window=None)
    _layered(layer_types=(full,) * 3, sliding_window=None)  # no sliding layer: no window needed


def test_layer_types_config_round_trips_through_dict_and_json():
    cfg = _layered(layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert cfg.layer_windows == (4, None, 4)
    hash(cfg)  # a static jit argument: must stay hashable
    assert jaxkv.ModelConfig.from_dict(cfg.to_dict()) == cfg
    back = jaxkv.ModelConfig.from_dict(json.loads(cfg.to_json()))  # JSON gives a list
    assert back == cfg and hash(back) == hash(cfg)
    assert isinstance(back.layer_types, tuple)


# --------------------------------------------------------------------------- issue 12 defects


def test_decode_step_rejects_out_of_vocabulary_tokens():
    cfg, params = tiny("test-gqa")
    _, cache = jaxkv.prefill(params, cfg, [[1, 2], [3]], capacity=16)
    for bad in ([cfg.vocab_size, 1], [-1, 1]):
        with pytest.raises(ValueError, match=f"token id {bad[0]} is outside the vocabulary"):
            jaxkv.decode_step(params, cfg, cache, np.array(bad, np.int32))
    # Nothing was consumed: the cache still works.
    logits, cache = jaxkv.decode_step(params, cfg, cache, np.array([1, 2], np.int32))
    assert np.isfinite(np.asarray(logits)).all()
    assert np.asarray(cache.lengths).tolist() == [3, 2]


def test_flat_prompt_says_what_shape_is_expected():
    cfg, params = tiny("test-gqa")
    with pytest.raises(ValueError, match="wrap a single prompt in a list"):
        jaxkv.generate(params, cfg, [1, 2, 3], max_new_tokens=2)


def test_donated_cache_is_named_in_jaxkv_words():
    cfg, params = tiny("test-gqa")
    _, cache = jaxkv.prefill(params, cfg, [[1, 2]], capacity=16)
    _, new = jaxkv.decode_step(params, cfg, cache, np.array([1], np.int32))
    with pytest.raises(ValueError, match="donated to an earlier call"):
        jaxkv.decode_step(params, cfg, cache, np.array([1], np.int32))
    with pytest.raises(ValueError, match="donated"):
        jaxkv.extend(params, cfg, cache, [[1]])
    jaxkv.decode_step(params, cfg, new, np.array([1], np.int32))


def test_tiny_temperature_is_greedy():
    cfg, params = tiny("test-gqa")
    assert jaxkv.SamplingConfig(temperature=1e-39).greedy
    got = jaxkv.generate(
        params, cfg, [[5, 6]], max_new_tokens=6, sampling=jaxkv.SamplingConfig(temperature=1e-39)
    )
    want = jaxkv.generate(params, cfg, [[5, 6]], max_new_tokens=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_decode_step_span_on_a_full_cache_and_on_rings():
    cfg, params = tiny("test-gqa")
    _, cache = jaxkv.prefill(params, cfg, [[1, 2, 3, 4]], capacity=4)  # full
    _, cache = jaxkv.decode_step(params, cfg, cache, np.array([1], np.int32), span=4)
    assert np.asarray(cache.lengths).tolist() == [4]  # no room: nothing stored, no error
    with pytest.raises(ValueError, match="span 3 must cover"):
        jaxkv.decode_step(params, cfg, cache, np.array([1], np.int32), span=3)
    _, ring = jaxkv.prefill(params, cfg, [[1, 2, 3, 4]], cache=jaxkv.Window(4))
    for _ in range(3):  # a ring always has room; span does not apply to it
        _, ring = jaxkv.decode_step(params, cfg, ring, np.array([1], np.int32), span=4)
    assert np.asarray(ring.lengths).tolist() == [7]


def test_cache_kind_arguments_are_validated():
    cfg, params = tiny("test-gqa")
    with pytest.raises(ValueError, match="Window.size must be >= 1"):
        jaxkv.Window(0)
    with pytest.raises(ValueError, match="Window.positions must be one of"):
        jaxkv.Window(4, sinks=1, positions="shifted")
    with pytest.raises(ValueError, match="got 3 cache kinds for a model of 2 layers"):
        jaxkv.KVCache.init(cfg, 1, 16, kinds=(jaxkv.Dense(),) * 3)
    with pytest.raises(ValueError, match="needs a capacity"):
        jaxkv.KVCache.init(cfg, 1)
    with pytest.raises(ValueError, match="capacity=8 was given with a cache of capacity 16"):
        jaxkv.generate(
            params, cfg, [[1]], max_new_tokens=2, capacity=8, cache=jaxkv.KVCache.init(cfg, 1, 16)
        )
    with pytest.raises(
        ValueError, match="cache_dtype=bfloat16 was given with a cache stored as float32"
    ):
        jaxkv.generate(
            params,
            cfg,
            [[1]],
            max_new_tokens=2,
            cache_dtype="bfloat16",
            cache=jaxkv.KVCache.init(cfg, 1, 16),
        )
    with pytest.raises(ValueError, match="batch size 2"):
        jaxkv.generate(params, cfg, [[1]], max_new_tokens=2, cache=jaxkv.KVCache.init(cfg, 2, 16))


def test_ring_refuses_a_rollback_past_what_it_evicted():
    cfg, params = tiny("test-gqa")
    _, ring = jaxkv.prefill(params, cfg, [list(range(1, 10))], cache=jaxkv.Window(4))
    ring.truncate(8)  # one token back: the ring still holds the window
    with pytest.raises(ValueError, match="cannot roll back to 5 tokens"):
        ring.truncate(5)
