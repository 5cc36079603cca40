"""Heavy-hitter eviction (H2O): equal to the dense cache when the budget holds everything,
and slot for slot equal to a NumPy reference that recomputes attention and accumulates
scores; its program updates the cache in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ATOL, random_prompts, tiny, tiny_cfg

import jaxkv
from jaxkv.cache import Heavy, HeavyLayer, KVCache
from jaxkv.layers import rope_frequencies


def test_budget_over_the_sequence_equals_dense(rng):
    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [3, 11, 1], cfg.vocab_size)
    dense = jaxkv.generate(params, cfg, prompts, max_new_tokens=24, capacity=64)
    heavy = jaxkv.generate(params, cfg, prompts, max_new_tokens=24, cache=Heavy(30, 10))
    np.testing.assert_array_equal(dense.tokens, heavy.tokens)
    ld, cd = jaxkv.prefill(params, cfg, prompts, capacity=64)
    lh, ch = jaxkv.prefill(params, cfg, prompts, cache=Heavy(30, 10))
    np.testing.assert_allclose(np.asarray(ld), np.asarray(lh), atol=ATOL, rtol=0)
    tok = np.array([5, 6, 7], np.int32)
    ld, _ = jaxkv.decode_step(params, cfg, cd, tok)
    lh, _ = jaxkv.decode_step(params, cfg, ch, tok)
    np.testing.assert_allclose(np.asarray(ld), np.asarray(lh), atol=ATOL, rtol=0)


def _layer0_qk(params, cfg, tokens):
    """Layer 0's rotated queries [T, N, G, H] and keys [T, N, H] of a token sequence, in
    NumPy (a one-layer model: its attention depends on the embeddings alone)."""
    x = np.asarray(params["embed"], np.float64)[tokens]
    scale = np.asarray(params["layers_0"]["attn_norm"]["scale"], np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale
    h = np.einsum("td,dngh->tngh", x, np.asarray(params["layers_0"]["attn"]["qkv"], np.float64))
    g = cfg.q_per_kv
    q, k = h[:, :, :g], h[:, :, g]
    freqs = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta), np.float64)
    ang = np.arange(len(tokens))[:, None] * freqs  # [T, H/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x, shape):
        c, s = cos.reshape(shape), sin.reshape(shape)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    t = len(tokens)
    return rope(q, (t, 1, 1, -1)), rope(k, (t, 1, -1))


def _reference_slots(q, k, prompt_len, steps, heavy, recent, kept=None):
    """Positions each KV head keeps after every decode step: attention of each new query over
    the kept keys and itself, probabilities summed over the group's query heads and
    accumulated; when full, the lowest score outside the recent window is evicted. `kept`:
    what each head kept of the prompt (default: all of it; the prompt's scores are its
    column sums either way)."""
    n, size = k.shape[1], heavy + recent
    kept = [list(range(prompt_len)) for _ in range(n)] if kept is None else kept
    score = [dict.fromkeys(range(prompt_len), 0.0) for _ in range(n)]
    # The prompt (shorter than the budget) is fed as one block: every query votes.
    for t in range(prompt_len):
        for h in range(n):
            keys = list(range(t + 1))
            s = np.einsum("gh,th->gt", q[t, h], k[keys, h]) / np.sqrt(k.shape[-1])
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            for j, pos in enumerate(keys):
                score[h][pos] += p[:, j].sum()
    score = [{pos: score[h][pos] for pos in kept[h]} for h in range(n)]
    out = []
    for t in range(prompt_len, prompt_len + steps):
        for h in range(n):
            keys = kept[h] + [t]
            s = np.einsum("gh,th->gt", q[t, h], k[keys, h]) / np.sqrt(k.shape[-1])
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            for j, pos in enumerate(kept[h]):
                score[h][pos] += p[:, j].sum()
            if len(kept[h]) == size:
                old = [pos for pos in kept[h] if pos <= t - recent]
                drop = min(old, key=lambda pos: (score[h][pos], kept[h].index(pos)))
                kept[h].remove(drop)
                del score[h][drop]
            kept[h].append(t)
            score[h][t] = p[:, -1].sum()
        out.append([sorted(x) for x in kept])
    return out


@pytest.mark.parametrize("heavy,recent", [(3, 2), (1, 4), (4, 1)])
def test_kept_slots_equal_a_numpy_reference(heavy, recent):
    """One layer, GQA (2 query heads per KV head), a 3-token prompt, then 14 decode steps:
    after every step each KV head holds exactly the reference's positions."""
    cfg, params = tiny_cfg(n_layers=1)
    rng = np.random.default_rng(heavy * 10 + recent)
    seq = rng.integers(0, cfg.vocab_size, 17).tolist()
    q, k = _layer0_qk(params, cfg, seq)
    want = _reference_slots(q, k, 3, 14, heavy, recent)
    _, cache = jaxkv.prefill(params, cfg, [seq[:3]], cache=Heavy(heavy, recent))
    for t, expected in zip(range(3, 17), want, strict=True):
        _, cache = jaxkv.decode_step(params, cfg, cache, np.array([seq[t]], np.int32))
        pos = np.asarray(cache.layers[0].pos)[0]
        got = [sorted(int(p) for p in row if p >= 0) for row in pos]
        assert got == expected, (t, got, expected)


def test_a_block_keeps_the_recent_window_and_the_heaviest(rng):
    """A prompt longer than the budget: each head keeps its `recent` newest positions plus
    the `heavy` older ones with the largest column sums of the prompt's attention."""
    cfg, params = tiny_cfg(n_layers=1)
    seq = rng.integers(0, cfg.vocab_size, 12).tolist()
    q, k = _layer0_qk(params, cfg, seq)
    heavy, recent = 3, 4
    _, cache = jaxkv.prefill(params, cfg, [seq], cache=Heavy(heavy, recent))
    pos = np.asarray(cache.layers[0].pos)[0]
    for h in range(cfg.n_kv_heads):
        col = np.zeros(12)
        for t in range(12):
            s = q[t, h] @ k[: t + 1, h].T / np.sqrt(cfg.head_dim)
            p = np.exp(s - s.max(-1, keepdims=True))
            col[: t + 1] += (p / p.sum(-1, keepdims=True)).sum(0)
        older = np.argsort(-col[: 12 - recent], kind="stable")[:heavy]
        assert sorted(pos[h].tolist()) == sorted([*older.tolist(), *range(12 - recent, 12)])


def test_heavy_decode_step_is_in_place():
    from test_cache_kinds import _aliased_params

    from jaxkv.bench.common import cache_sized_copies
    from jaxkv.loops import Loop, decode_step_jit

    cfg, params = tiny("test-gqa")
    cache = KVCache.init(cfg, 2, kinds=Heavy(150, 50))
    assert isinstance(cache.layers[0], HeavyLayer) and cache.layers[0].slots == 200
    args = (params, cache, jnp.zeros(2, jnp.int32), jnp.ones(2, bool))
    text = decode_step_jit.lower(*args, loop=Loop(config=cfg)).compile().as_text()
    n = len(jax.tree.leaves(params))
    assert set(range(n, n + len(jax.tree.leaves(cache)))) <= _aliased_params(text)
    assert cache_sized_copies(text, 200) == []


def test_heavy_arguments_are_validated():
    with pytest.raises(ValueError, match="Heavy.recent must be an int >= 1"):
        Heavy(4, 0)
    with pytest.raises(ValueError, match="Heavy.policy must be one of"):
        Heavy(4, 4, "lfu")
    cfg, _ = tiny_cfg(sliding_window=4)
    with pytest.raises(ValueError, match="heavy-hitter eviction applies to full-attention"):
        KVCache.init(cfg, 1, kinds=Heavy(4, 4))
    with pytest.raises(ValueError, match="a scale per token and head, not int8 .token scales"):
        KVCache.init(tiny("test-gqa")[0], 1, None, jaxkv.KVQuant("int8", "token"), Heavy(4, 4))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_heavy_layers_equal_the_quantized_dense_cache(dtype, rng):
    """H2O and SnapKV with int8/int4 storage (a scale per token and KV head, carried with
    the slots they keep): with a budget over the sequence, the dense quantized cache's
    logits through prefill, extend and decode; the decode program stays in place."""
    from test_cache_kinds import _aliased_params

    from jaxkv.bench.common import cache_sized_copies
    from jaxkv.loops import Loop, decode_step_jit

    cfg, params = tiny("test-gqa")
    prompts = random_prompts(rng, [3, 11], cfg.vocab_size)
    more = random_prompts(rng, [4, 2], cfg.vocab_size)
    toks = rng.integers(0, cfg.vocab_size, (6, 2)).astype(np.int32)
    ref = None
    for kind in (None, Heavy(30, 10), jaxkv.SnapKV(40, 8)):
        logits = []
        _, c = jaxkv.prefill(params, cfg, prompts, capacity=64, cache=kind, cache_dtype=dtype)
        out, c = jaxkv.extend(params, cfg, c, more)
        logits += [out[0, :4], out[1, :2]]
        for t in toks:
            out, c = jaxkv.decode_step(params, cfg, c, t)
            logits.append(out)
        if ref is None:
            ref = logits
            continue
        assert c.layers[0].k_scale.shape == (2, cfg.n_kv_heads, 40)
        for got, want in zip(logits, ref, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    cache = KVCache.init(cfg, 2, None, dtype, Heavy(150, 50))
    args = (params, cache, jnp.zeros(2, jnp.int32), jnp.ones(2, bool))
    text = decode_step_jit.lower(*args, loop=Loop(config=cfg)).compile().as_text()
    n = len(jax.tree.leaves(params))
    assert set(range(n, n + len(jax.tree.leaves(cache)))) <= _aliased_params(text)
    assert cache_sized_copies(text, 200) == []
