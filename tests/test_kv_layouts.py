"""Scale layouts of quantized storage (per token and head, per token, KIVI keys per channel)
and the full-precision residual group: what each stores equals an independent NumPy
quantization of the float cache's keys and values, a residual covering every token gives the
float cache's logits, and the programs stay in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny, tiny_cfg

import jaxkv
from jaxkv.cache import KVCache, Window
from jaxkv.cache.quant import KVQuant, dequantize, quantize_channels, unpack


@pytest.mark.parametrize("pack", [False, True])
def test_channel_round_trip_error_is_at_most_half_a_scale(rng, pack):
    x = rng.normal(size=(2, 3, 8, 24)).astype(np.float32) * rng.uniform(0.1, 50, (2, 3, 8, 1))
    q, scale = quantize_channels(jnp.asarray(x), 8, pack)
    assert scale.shape == (2, 3, 8, 3) and q.shape == ((2, 3, 4, 24) if pack else x.shape)
    back = np.asarray(dequantize(q, scale, 3, jnp.float32))
    assert int(jnp.abs(unpack(q, 2)).max()) <= (7 if pack else 127)
    bound = np.repeat(np.asarray(scale), 8, axis=3) / 2
    assert (np.abs(back - x) <= bound + 1e-6 * np.abs(x)).all()


def _fake_quant(x: np.ndarray, held: np.ndarray, scales: str, group: int, qmax: float, keys):
    """x [B, N, H, T] (keys) or [B, N, T, H] (values) of the float cache, held [B, T]: each
    held vector quantized and dequantized by the layout's rule, in NumPy."""
    if not keys:
        x = x.transpose(0, 1, 3, 2)  # values as [B, N, H, T] too
    x = np.where(held[:, None, None, :], x.astype(np.float64), 0.0)
    if scales == "kivi" and keys:  # per channel and group of slots
        b, n, h, t = x.shape
        g = np.abs(x.reshape(b, n, h, t // group, group)).max(-1, keepdims=True) / qmax
        s = np.repeat(g[..., 0], group, axis=3)
    elif scales == "token":
        s = np.abs(x).max(axis=(1, 2), keepdims=True) / qmax
    else:  # per token and head (also KIVI's values)
        s = np.abs(x).max(axis=2, keepdims=True) / qmax
    safe = np.where(s > 0, s, 1.0)
    out = np.clip(np.round(x / safe), -qmax, qmax) * s
    return out if keys else out.transpose(0, 1, 3, 2)


SPECS = [
    KVQuant("int8", "token"),
    KVQuant("int8", "kivi", 8),
    KVQuant("int8", "kivi", 8, residual=True),
    KVQuant("int4", "kivi", 8, residual=True),
    KVQuant("int8", "head", 8, residual=True),
]


@pytest.mark.parametrize("lengths", [(13, 6), (20, 6)])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_stored_values_equal_a_numpy_quantization_of_the_float_cache(spec, lengths):
    """A one-layer model (its keys and values depend on the tokens alone) fed the same ragged
    prefill, decode steps with a paused row, and an extension, through a float cache and a
    quantized one: after each, the quantized store dequantizes to the NumPy quantization of
    the float cache's contents (KIVI key groups scaled over the tokens they hold so far), and
    the residual holds the group being filled exactly. (A 20-token prompt is padded to a
    32-token bucket: its trailing padding columns must not move the copy.)"""
    cfg, params = tiny_cfg(n_layers=1)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    _, cf = jaxkv.prefill(params, cfg, prompts, capacity=64)
    _, cq = jaxkv.prefill(params, cfg, prompts, capacity=64, cache_dtype=spec)
    qmax = 7.0 if spec.dtype == "int4" else 127.0

    def check():
        f, q = cf.layers[0], cq.layers[0]
        held = np.asarray(cf.positions) >= 0
        np.testing.assert_array_equal(np.asarray(cq.positions), np.asarray(cf.positions))
        for name, axis, keys in (("k", 3, True), ("v", 2, False)):
            want = _fake_quant(np.asarray(getattr(f, name)), held, spec.scales, 8, qmax, keys)
            got = dequantize(getattr(q, name), getattr(q, f"{name}_scale"), axis, jnp.float32)
            got = np.asarray(got, np.float64)
            mask = held[:, None, None, :] if keys else held[:, None, :, None]
            np.testing.assert_allclose(np.where(mask, got, 0), want, rtol=1e-5, atol=1e-6)
        if spec.grouped:
            start = (int(cq.index) - 1) // 8 * 8  # the group of the last slot stored
            np.testing.assert_array_equal(
                q.k_res[..., : int(cq.index) - start], f.k[..., start : int(cq.index)]
            )
            want_pos = np.asarray(cf.positions)[:, start : start + 8]
            np.testing.assert_array_equal(np.asarray(q.res_pos), want_pos)

    check()
    for step in range(11):
        tok = rng.integers(0, cfg.vocab_size, 2).astype(np.int32)
        active = np.array([True, step % 3 != 1])
        _, cf = jaxkv.decode_step(params, cfg, cf, tok, active=active)
        _, cq = jaxkv.decode_step(params, cfg, cq, tok, active=active)
        check()
    more = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (11, 3)]
    _, cf = jaxkv.extend(params, cfg, cf, more)
    _, cq = jaxkv.extend(params, cfg, cq, more)
    check()


def test_a_residual_over_every_token_gives_the_float_logits():
    """With the whole sequence inside the group being filled, attention reads only the
    full-precision copy: the logits are the float cache's. Without the residual the same
    layout reads quantized keys and differs."""
    cfg, params = tiny("test-gqa")
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, cfg.vocab_size, (2, 9)).tolist()
    with_res = KVQuant("int4", "kivi", 64, residual=True)
    without = KVQuant("int4", "kivi", 64)
    lf, cf = jaxkv.prefill(params, cfg, prompts, capacity=64)
    lr, cr = jaxkv.prefill(params, cfg, prompts, capacity=64, cache_dtype=with_res)
    ln, cn = jaxkv.prefill(params, cfg, prompts, capacity=64, cache_dtype=without)
    gap = 0.0
    for t in rng.integers(0, cfg.vocab_size, (20, 2)).astype(np.int32):
        lf, cf = jaxkv.decode_step(params, cfg, cf, t)
        lr, cr = jaxkv.decode_step(params, cfg, cr, t)
        ln, cn = jaxkv.decode_step(params, cfg, cn, t)
        np.testing.assert_allclose(np.asarray(lr), np.asarray(lf), atol=1e-5, rtol=0)
        gap = max(gap, float(jnp.max(jnp.abs(ln - lf))))
    assert gap > 1e-3


@pytest.mark.parametrize(
    "spec",
    [KVQuant("int8", "token"), KVQuant("int8", "kivi", 32, residual=True)],
    ids=lambda s: s.describe(),
)
def test_layouts_decode_in_place(spec):
    from test_cache_kinds import _aliased_params

    from jaxkv.bench.common import cache_sized_copies
    from jaxkv.loops import Loop, decode_step_jit

    cfg, params = tiny("test-gqa")
    cache = KVCache.init(cfg, 2, 1024, spec)
    args = (params, cache, jnp.zeros(2, jnp.int32), jnp.ones(2, bool))
    text = decode_step_jit.lower(*args, loop=Loop(config=cfg)).compile().as_text()
    n = len(jax.tree.leaves(params))
    assert set(range(n, n + len(jax.tree.leaves(cache)))) <= _aliased_params(text)
    assert cache_sized_copies(text, 1024) == []


def test_layout_bytes_per_token():
    """Per token, layer and KV head: int8 K and V (2 * head_dim bytes) plus scales: 8 bytes
    per head ("head"), 8 bytes per token shared by the heads ("token"), KIVI: a key scale per
    channel per group of 32 tokens (4 * head_dim / 32) and a value scale (4)."""
    cfg = jaxkv.preset("llama-3m")
    n, h, layers = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers

    def per_token(spec):
        return (
            jaxkv.cache_memory_bytes(cfg, 1, 4096, spec)
            - jaxkv.cache_memory_bytes(cfg, 1, 2048, spec)
        ) / 2048 - 4  # the position table's int32

    assert per_token(KVQuant("int8", "head")) == layers * n * (2 * h + 8)
    assert per_token(KVQuant("int8", "token")) == layers * (n * 2 * h + 8)
    assert per_token(KVQuant("int8", "kivi")) == layers * n * (2 * h + 4 * h / 32 + 4)
    assert per_token(KVQuant("int8", "kivi", residual=True)) == per_token(KVQuant("int8", "kivi"))


def test_truncate_reloads_the_residual_from_the_store():
    cfg, params = tiny("test-gqa")
    rng = np.random.default_rng(2)
    spec = KVQuant("int8", "kivi", 8, residual=True)
    prompt = [rng.integers(0, 97, 20).tolist()]
    _, cache = jaxkv.prefill(params, cfg, prompt, capacity=64, cache_dtype=spec)
    for t in range(6):
        _, cache = jaxkv.decode_step(params, cfg, cache, np.array([t + 1], np.int32))
    cache = cache.truncate(18)
    assert int(cache.index) == 18 and int(cache.lengths[0]) == 18
    layer = cache.layers[1]
    want = dequantize(layer.k[..., 16:24], layer.k_scale[..., 2:3], 3, jnp.float32)
    np.testing.assert_allclose(np.asarray(layer.k_res), np.asarray(want), rtol=1e-6)
    assert np.asarray(layer.res_pos).tolist() == [[16, 17, -1, -1, -1, -1, -1, -1]]
    _, cache = jaxkv.decode_step(params, cfg, cache, np.array([3], np.int32))
    assert int(cache.index) == 19
    # Within the group being filled the copy stays exact (full precision, not reloaded).
    k_res = np.asarray(cache.layers[1].k_res)
    cache = cache.truncate(17)
    layer = cache.layers[1]
    np.testing.assert_array_equal(np.asarray(layer.k_res)[..., :1], k_res[..., :1])
    assert np.asarray(layer.res_pos).tolist() == [[16] + [-1] * 7]
    assert float(jnp.abs(layer.v_res[:, :, 1:]).max()) == 0.0  # freed values zeroed


def test_a_full_cache_keeps_its_full_precision_copy():
    """Steps on a full cache store nothing and leave the copy of the last group alone."""
    cfg, params = tiny("test-gqa")
    spec = KVQuant("int8", "kivi", 8, residual=True)
    _, cache = jaxkv.prefill(params, cfg, [list(range(1, 13))], capacity=16, cache_dtype=spec)
    for t in range(4):
        _, cache = jaxkv.decode_step(params, cfg, cache, np.array([t + 1], np.int32))
    assert cache.room() == 0
    before = np.asarray(cache.layers[0].k_res)
    logits = []
    for _ in range(2):
        out, cache = jaxkv.decode_step(params, cfg, cache, np.array([5], np.int32))
        logits.append(np.asarray(out))
    np.testing.assert_array_equal(np.asarray(cache.layers[0].k_res), before)
    assert np.asarray(cache.layers[0].res_pos).tolist() == [list(range(8, 16))]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_layout_errors():
    with pytest.raises(ValueError, match="KVQuant.scales must be one of"):
        KVQuant("int8", "channel")
    with pytest.raises(ValueError, match="KVQuant.dtype must be one of"):
        KVQuant("fp8")
    cfg, _ = tiny("test-gqa")
    with pytest.raises(ValueError, match="only dense layers have; this cache also has Window"):
        KVCache.init(cfg, 1, 64, KVQuant("int8", "kivi"), Window(16))
    cache = KVCache.init(cfg, 1, 60, KVQuant("int8", "kivi", 8))
    assert cache.capacity == 64  # whole groups
    assert cache.storage() == KVQuant("int8", "kivi", 8)
    params = tiny("test-gqa")[1]
    reused = KVCache.init(cfg, 1, 64, "int8")
    with pytest.raises(ValueError, match=r"cache_dtype=int8 \(kivi scales.*stored as int8 \(head"):
        jaxkv.generate(
            params,
            cfg,
            [[1, 2]],
            max_new_tokens=4,
            cache=reused,
            cache_dtype=KVQuant(scales="kivi"),
        )
    from jaxkv.evaluation import perplexity

    with pytest.raises(ValueError, match="only dense layers have"):
        perplexity(params, cfg, [1, 2, 3], cache=Window(2), cache_dtype=KVQuant(residual=True))


def test_reused_cache_with_one_kv_head_accepts_either_per_token_layout():
    """With one KV head, scales per token and per token and head are the same arrays: a cache
    made for either is reused under the other (it reads as per head); with two heads the
    mismatch is still an error."""
    cfg, params = tiny("test-mqa")
    run = dict(max_new_tokens=6, cache_dtype=KVQuant("int8", "token"))
    fresh = jaxkv.generate(params, cfg, [[1, 2, 3]], capacity=64, **run)
    reused = KVCache.init(cfg, 1, 64, KVQuant("int8", "token"))
    assert reused.storage() == KVQuant("int8", "head")
    again = jaxkv.generate(params, cfg, [[1, 2, 3]], cache=reused, **run)
    np.testing.assert_array_equal(again.tokens, fresh.tokens)
    gqa, gqa_params = tiny("test-gqa")
    other = KVCache.init(gqa, 1, 64, "int8")
    with pytest.raises(ValueError, match=r"cache_dtype=int8 \(token scales\) was given"):
        jaxkv.generate(gqa_params, gqa, [[1, 2]], cache=other, **run)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_token_scales_in_a_ring_equal_the_dense_layer(dtype, rng):
    """Scales shared by the heads in ring layers: a ring (with sinks) wider than the
    sequence gives the dense layer's logits with the same layout, through prefill and
    decode; a narrower one runs past its window."""
    cfg, params = tiny("test-gqa")
    spec = KVQuant(dtype, "token")
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (7, 12)]
    toks = rng.integers(0, cfg.vocab_size, (8, 2)).astype(np.int32)
    runs = []
    for kind in (None, Window(40, sinks=2)):
        out, c = jaxkv.prefill(params, cfg, prompts, capacity=64, cache=kind, cache_dtype=spec)
        logits = [out]
        for t in toks:
            out, c = jaxkv.decode_step(params, cfg, c, t)
            logits.append(out)
        assert c.layers[0].k_scale.shape[1] == 1
        runs.append(logits)
    for got, want in zip(*runs, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    res = jaxkv.generate(
        params, cfg, prompts, max_new_tokens=30, cache=Window(8, sinks=2), cache_dtype=spec
    )
    assert res.tokens.shape == (2, 30)
