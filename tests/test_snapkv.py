"""SnapKV prefill compression: the slots it keeps equal a NumPy reference of the pooled vote
(SnapKV's own recipe: the window's attention summed, avg_pool1d, top-k), for ragged prompts;
decoding then continues as H2O or as a ring, slot for slot against references; a budget that
holds everything equals the dense cache; the decode program updates the cache in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny, tiny_cfg
from test_heavy import _layer0_qk, _reference_slots

import jaxkv
from jaxkv.cache import HeavyLayer, KVCache, SnapKV
from jaxkv.cache.heavy import pool_by_position


def _softmax_rows(q, k):
    s = q @ k.T / np.sqrt(k.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _snap_reference(q, k, length, budget, window, kernel):
    """Per KV head, the positions SnapKV keeps of a `length`-token prompt: the last `window`
    queries' attention (each over the causal prefix, summed over the group's query heads),
    summed over those queries for each older position, avg_pool1d(kernel, padding
    kernel // 2, zeros counted), the top budget - window, plus the window."""
    keep = []
    prefix = length - window
    for h in range(k.shape[1]):
        votes = np.zeros(prefix)
        for t in range(prefix, length):
            p = _softmax_rows(q[t, h], k[: t + 1, h])  # [G, t + 1]
            votes += p[:, :prefix].sum(0)
        padded = np.pad(votes, kernel // 2)
        pooled = np.array([padded[i : i + kernel].sum() / kernel for i in range(prefix)])
        top = np.argsort(-pooled, kind="stable")[: budget - window]
        keep.append(sorted([*top.tolist(), *range(prefix, length)]))
    return keep


def _kept(layer: HeavyLayer, row: int) -> list[list[int]]:
    pos = np.asarray(layer.pos)[row]
    return [sorted(int(p) for p in head if p >= 0) for head in pos]


def test_pool_by_position_is_avg_pool1d_over_positions(rng):
    """Slots in any order, positions with gaps: the same as pooling the dense sequence."""
    pos = np.full((2, 3, 12), -1, np.int32)
    x = np.zeros((2, 3, 12), np.float32)
    for b in range(2):
        for n in range(3):
            held = np.sort(rng.choice(30, size=9, replace=False))
            slots = rng.permutation(12)[:9]
            pos[b, n, slots] = held
            x[b, n, slots] = rng.random(9)
    got = np.asarray(pool_by_position(jnp.asarray(pos), jnp.asarray(x), 7))
    for b in range(2):
        for n in range(3):
            dense = np.zeros(30)
            held = pos[b, n] >= 0
            dense[pos[b, n][held]] = x[b, n][held]
            want = np.array([np.pad(dense, 3)[i : i + 7].sum() / 7 for i in range(30)])
            np.testing.assert_allclose(got[b, n][held], want[pos[b, n][held]], atol=1e-6)


@pytest.mark.parametrize("decode", ["h2o", "ring"])
@pytest.mark.parametrize("budget,window,kernel", [(8, 3, 7), (10, 4, 3), (6, 1, 1)])
def test_prefill_keeps_the_reference_vote(decode, budget, window, kernel):
    """Ragged prompts (20, 13, 9 and 5 tokens; the last fits and keeps everything); GQA with
    two query heads per KV head. Layer 0 of a two-layer model: its keys depend on the
    embeddings alone."""
    cfg, params = tiny_cfg(n_layers=2)
    rng = np.random.default_rng(budget + window)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (20, 13, 9, 5)]
    _, cache = jaxkv.prefill(params, cfg, prompts, cache=SnapKV(budget, window, kernel, decode))
    for b, prompt in enumerate(prompts):
        q, k = _layer0_qk(params, cfg, prompt)
        if len(prompt) <= budget:
            want = [list(range(len(prompt)))] * cfg.n_kv_heads
        else:
            want = _snap_reference(q, k, len(prompt), budget, window, kernel)
        assert _kept(cache.layers[0], b) == want, (b, decode)


def test_decode_after_snapkv_continues_as_h2o():
    """After SnapKV's selection, each decode step evicts as H2O does, with the prompt's
    scores accumulated over all of its queries."""
    cfg, params = tiny_cfg(n_layers=1)
    rng = np.random.default_rng(3)
    seq = rng.integers(0, cfg.vocab_size, 30).tolist()
    budget, window = 8, 3
    q, k = _layer0_qk(params, cfg, seq)
    kept = _snap_reference(q, k, 18, budget, window, 7)
    want = _reference_slots(q, k, 18, 12, budget - window, window, [list(x) for x in kept])
    _, cache = jaxkv.prefill(params, cfg, [seq[:18]], cache=SnapKV(budget, window))
    assert _kept(cache.layers[0], 0) == kept
    for t, expected in zip(range(18, 30), want, strict=True):
        _, cache = jaxkv.decode_step(params, cfg, cache, np.array([seq[t]], np.int32))
        assert _kept(cache.layers[0], 0) == expected, t


def test_decode_after_snapkv_continues_as_a_ring():
    """decode="ring": the selected tokens stay; the window and every new token slide."""
    cfg, params = tiny_cfg(n_layers=1)
    rng = np.random.default_rng(4)
    seq = rng.integers(0, cfg.vocab_size, 30).tolist()
    budget, window = 8, 3
    q, k = _layer0_qk(params, cfg, seq)
    kept = _snap_reference(q, k, 18, budget, window, 7)
    _, cache = jaxkv.prefill(params, cfg, [seq[:18]], cache=SnapKV(budget, window, decode="ring"))
    for t in range(18, 30):
        _, cache = jaxkv.decode_step(params, cfg, cache, np.array([seq[t]], np.int32))
        got = _kept(cache.layers[0], 0)
        for h, held in enumerate(kept):
            selected = [p for p in held if p < 18 - window]
            assert got[h] == sorted([*selected, *range(t + 1 - window, t + 1)]), (t, h)


def test_budget_over_the_sequence_equals_dense(rng):
    cfg, params = tiny("test-gqa")
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 11, 1)]
    dense = jaxkv.generate(params, cfg, prompts, max_new_tokens=24, capacity=64)
    for decode in ("h2o", "ring"):
        snap = jaxkv.generate(
            params, cfg, prompts, max_new_tokens=24, cache=SnapKV(40, 8, decode=decode)
        )
        np.testing.assert_array_equal(dense.tokens, snap.tokens)


def test_snapkv_generation_compiles_once_and_decodes_in_place(rng):
    from test_cache_kinds import _aliased_params

    from jaxkv.bench.common import cache_sized_copies
    from jaxkv.loops import Loop, decode_step_jit

    cfg, params = tiny("test-gqa")
    cache = KVCache.init(cfg, 2, kinds=SnapKV(200, 32, decode="ring"))
    assert cache.describe() == "2 x snapkv(budget=200, window=32, kernel=7, decode=ring)"
    args = (params, cache, jnp.zeros(2, jnp.int32), jnp.ones(2, bool))
    text = decode_step_jit.lower(*args, loop=Loop(config=cfg)).compile().as_text()
    n = len(jax.tree.leaves(params))
    assert set(range(n, n + len(jax.tree.leaves(cache)))) <= _aliased_params(text)
    assert cache_sized_copies(text, 200) == []
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (300, 7)]
    out = jaxkv.generate(params, cfg, prompts, max_new_tokens=40, cache=SnapKV(64, 16))
    assert out.tokens.shape == (2, 40)


def test_snapkv_arguments_are_validated():
    with pytest.raises(ValueError, match=r"SnapKV.window \(32\) must be smaller than the budget"):
        SnapKV(32)
    with pytest.raises(ValueError, match="SnapKV.kernel must be odd"):
        SnapKV(64, kernel=4)
    with pytest.raises(ValueError, match="SnapKV.decode must be one of"):
        SnapKV(64, decode="lru")
    with pytest.raises(ValueError, match="SnapKV.budget must be an int >= 2"):
        SnapKV(1.5)
    cfg, _ = tiny_cfg(sliding_window=4)
    with pytest.raises(ValueError, match="SnapKV applies to full-attention"):
        KVCache.init(cfg, 1, kinds=SnapKV(8, 2))
    with pytest.raises(ValueError, match="a scale per token and head, not int8 .kivi"):
        KVCache.init(tiny("test-gqa")[0], 1, None, jaxkv.KVQuant("int8", "kivi"), SnapKV(8, 2))


def test_perplexity_after_a_prompt_block(rng):
    """`prompt=P`: the first P tokens as one block, then token by token. With the dense cache
    every NLL equals the token-by-token one; with SnapKV in a small budget the prompt's NLLs
    still do (a block sees itself whole) and the continuation's differ; the perplexity
    is the continuation's."""
    from jaxkv.evaluation import perplexity, token_scores

    cfg, params = tiny("test-gqa")
    tokens = rng.integers(0, cfg.vocab_size, 60).tolist()
    ref, ref_top1 = token_scores(params, cfg, tokens)
    nll, top1 = token_scores(params, cfg, tokens, prompt=40)
    np.testing.assert_allclose(nll, ref, atol=1e-4)
    np.testing.assert_array_equal(top1, ref_top1)
    ppl, snap = perplexity(params, cfg, tokens, prompt=40, cache=SnapKV(12, 4))
    np.testing.assert_allclose(snap[:40], ref[:40], atol=1e-4)
    assert np.abs(snap[40:] - ref[40:]).max() > 1e-3
    assert ppl == pytest.approx(float(np.exp(snap[40:].mean())))
    with pytest.raises(ValueError, match=r"prompt must be an int in \[0, 59\) for 60 tokens"):
        token_scores(params, cfg, tokens, prompt=59)


@pytest.mark.parametrize("kind", [jaxkv.Heavy(30, 10), SnapKV(40, 8), SnapKV(40, 8, decode="ring")])
def test_extend_with_a_budget_over_the_sequence_equals_dense(kind, rng):
    """Blocks after the first (extend) attend to per-head stored slots; with nothing to evict
    every logit equals the dense cache's, ragged rows included."""
    cfg, params = tiny("test-gqa")
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 9)]
    more = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (7, 2)]
    _, dense = jaxkv.prefill(params, cfg, prompts, capacity=64)
    _, other = jaxkv.prefill(params, cfg, prompts, cache=kind)
    ld, dense = jaxkv.extend(params, cfg, dense, more)
    lo, other = jaxkv.extend(params, cfg, other, more)
    for b, row in enumerate(more):  # padding positions' logits are not defined
        np.testing.assert_allclose(lo[b, : len(row)], ld[b, : len(row)], atol=1e-5, rtol=0)
    tok = np.array([3, 4], np.int32)
    ld, _ = jaxkv.decode_step(params, cfg, dense, tok)
    lo, _ = jaxkv.decode_step(params, cfg, other, tok)
    np.testing.assert_allclose(np.asarray(lo), np.asarray(ld), atol=1e-5, rtol=0)
