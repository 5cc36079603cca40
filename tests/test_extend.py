"""extend (multi-token appends onto a cache), chunked prefill and cache truncation, against the
uncached forward."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import ATOL, count_compiles, reference_logits, tiny, tiny_cfg

import jaxkv
from jaxkv.loops import Loop, prefill_jit
from jaxkv.prefill import _extend_jit


def _split_rows(rng, lengths_per_part, vocab):
    """Rows of tokens, each cut into parts of the given lengths: parts[p][b]."""
    n_rows = len(lengths_per_part[0])
    full = [
        rng.integers(0, vocab, size=sum(p[b] for p in lengths_per_part)).tolist()
        for b in range(n_rows)
    ]
    parts, start = [], [0] * n_rows
    for lens in lengths_per_part:
        parts.append([full[b][start[b] : start[b] + lens[b]] for b in range(n_rows)])
        start = [start[b] + lens[b] for b in range(n_rows)]
    return full, parts


@pytest.mark.parametrize("name", ["test-gqa", "test-mqa"])
def test_prefill_extend_extend_equals_forward(name, rng):
    cfg, params = tiny(name)
    # Ragged in every part: a row may be the longest in one part and the shortest in the next.
    full, (a, b, c) = _split_rows(rng, [[3, 9, 1], [5, 1, 7], [2, 6, 4]], cfg.vocab_size)
    ref = reference_logits(params, cfg, full)
    last_a, cache = jaxkv.prefill(params, cfg, a, capacity=64)
    logits_b, cache = jaxkv.extend(params, cfg, cache, b)
    logits_c, cache = jaxkv.extend(params, cfg, cache, c, logits="last")
    for row in range(3):
        la, lb, lc = len(a[row]), len(b[row]), len(c[row])
        np.testing.assert_allclose(last_a[row], ref[row][la - 1], atol=ATOL)
        np.testing.assert_allclose(logits_b[row, :lb], ref[row][la : la + lb], atol=ATOL)
        np.testing.assert_allclose(logits_c[row], ref[row][la + lb + lc - 1], atol=ATOL)
    assert logits_b.shape == (3, max(map(len, b)), cfg.vocab_size)
    np.testing.assert_array_equal(cache.lengths, [len(r) for r in full])
    # Decoding goes on from the extended cache at each row's own position.
    nxt = np.asarray(logits_c).argmax(-1)
    step, _ = jaxkv.decode_step(params, cfg, cache, nxt)
    ref2 = reference_logits(params, cfg, [[*f, int(t)] for f, t in zip(full, nxt, strict=True)])
    for row in range(3):
        np.testing.assert_allclose(step[row], ref2[row][-1], atol=ATOL)


@pytest.mark.parametrize(("logits", "chunk"), [("all", 16), ("last", 16), ("all", 4), ("last", 4)])
def test_extend_in_chunks_equals_forward(logits, chunk, rng):
    """37 new tokens into the 37 slots left: in chunks of 16, two full chunks in a scan, then a
    remainder of 5 that holds the longest row's last tokens; in chunks of 4, nine chunks in
    four scans of growing spans, then a remainder of 1."""
    cfg, params = tiny("test-gqa")
    full, (a, b) = _split_rows(rng, [[4, 2], [37, 29]], cfg.vocab_size)
    ref = reference_logits(params, cfg, full)
    _, cache = jaxkv.prefill(params, cfg, a, capacity=41)
    out, cache = jaxkv.extend(params, cfg, cache, b, logits=logits, prefill_chunk=chunk)
    for row in range(2):
        la, lb = len(a[row]), len(b[row])
        if logits == "all":
            np.testing.assert_allclose(out[row, :lb], ref[row][la : la + lb], atol=ATOL)
        else:
            np.testing.assert_allclose(out[row], ref[row][la + lb - 1], atol=ATOL)
    assert int(cache.index) == 41
    np.testing.assert_array_equal(cache.lengths, [41, 31])


@pytest.mark.parametrize("capacity", [100, 128])
def test_chunked_prefill_equals_one_shot(capacity, rng):
    """A 70-token prompt in chunks of 16 (bucket 100 or 128: a remainder chunk or none) gives
    the forward's logits, and generation from it the same tokens as from a one-shot prefill."""
    cfg, params = tiny("test-gqa")
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (70, 33, 1)]
    ref = reference_logits(params, cfg, prompts, pad_to=128)
    last, cache = jaxkv.prefill(params, cfg, prompts, capacity=capacity, prefill_chunk=16)
    for row, _p in enumerate(prompts):
        np.testing.assert_allclose(last[row], ref[row][-1], atol=ATOL)
    np.testing.assert_array_equal(cache.lengths, [70, 33, 1])
    kw = dict(max_new_tokens=capacity - 70 - 8, capacity=capacity)
    one = jaxkv.generate(params, cfg, prompts, **kw)
    chunked = jaxkv.generate(params, cfg, prompts, prefill_chunk=16, **kw)
    np.testing.assert_array_equal(one.tokens, chunked.tokens)


def test_chunked_prefill_memory_follows_the_chunk():
    """The compiled prefill of 2048 tokens needs far less scratch memory in chunks of 128 than
    in one piece (whose scores alone are heads * 2048^2 * 4 bytes per layer)."""
    cfg, params = tiny("test-gqa")
    tok = np.zeros((1, 2048), np.int32)

    def temp_bytes(chunk):
        loop = Loop(config=cfg, capacity=2048, cache_dtype=None, chunk=chunk)
        compiled = prefill_jit.lower(params, tok, tok, None, loop=loop).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(4096), temp_bytes(128)
    scores = cfg.n_heads * 2048 * 2048 * 4
    assert whole >= scores
    assert chunked < scores / 4, (whole, chunked)


def test_extend_compiles_once_per_bucket(rng):
    """New lengths in a seen bucket and span trace nothing new (only the host-side slice of the
    logits to the longest row is a new tiny program); the same lengths compile nothing."""
    cfg, params = tiny_cfg()
    _, cache = jaxkv.prefill(params, cfg, [[1, 2, 3]], capacity=256)
    _, cache = jaxkv.extend(params, cfg, cache, [[4, 5, 6, 7, 8]])
    before = _extend_jit._cache_size()
    for n in (3, 9, 16):  # all in the bucket of 16, all within the first span
        _, cache = jaxkv.extend(params, cfg, cache, [list(range(1, n + 1))])
    assert _extend_jit._cache_size() == before
    with count_compiles() as counter:
        for n in (3, 9, 16):
            _, cache = jaxkv.extend(params, cfg, cache, [list(range(2, n + 2))])
    assert counter.count == 0


def test_truncate_rolls_back(rng):
    """prefill(a + b), truncated to a, then extended with c == prefill(a + c)."""
    cfg, params = tiny("test-gqa")
    a = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (5, 2)]
    b = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (3, 8)]
    c = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (4, 1)]
    _, cache = jaxkv.prefill(params, cfg, [x + y for x, y in zip(a, b, strict=True)], capacity=64)
    cache = cache.truncate(np.array([5, 2]))
    np.testing.assert_array_equal(cache.lengths, [5, 2])
    logits, cache = jaxkv.extend(params, cfg, cache, c)
    ref = reference_logits(params, cfg, [x + y for x, y in zip(a, c, strict=True)])
    for row in range(2):
        la, lc = len(a[row]), len(c[row])
        np.testing.assert_allclose(logits[row, :lc], ref[row][la : la + lc], atol=ATOL)
    # The slots freed by the rollback are written again: index is back to the held prefix.
    full = cache.truncate(0)
    assert int(full.index) == 0 and int(full.lengths.max()) == 0
    with pytest.raises(ValueError, match=r"keep must be >= 0, got \[3, -1\]"):
        cache.truncate(np.array([3, -1]))
    with pytest.raises(ValueError, match=r"one int or 2 ints .* shape \(3,\)"):
        cache.truncate(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="keep must be ints"):
        cache.truncate(1.5)


def test_extend_errors():
    cfg, params = tiny_cfg()
    _, cache = jaxkv.prefill(params, cfg, [[1, 2, 3], [4]], capacity=16)
    with pytest.raises(ValueError, match="2 rows .* batch size 2|1 rows of tokens for a cache"):
        jaxkv.extend(params, cfg, cache, [[1]])
    with pytest.raises(ValueError, match=r"holds 3 of 16 slots; extending by 14 tokens needs 17"):
        jaxkv.extend(params, cfg, cache, [[1] * 14, [2]])
    with pytest.raises(ValueError, match="logits must be 'all' or 'last'"):
        jaxkv.extend(params, cfg, cache, [[1], [2]], logits="first")
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        jaxkv.extend(params, cfg, cache, [[1], [2]], prefill_chunk=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        jaxkv.extend(params, cfg, cache, [[1], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jaxkv.extend(params, cfg, cache, [[1], [cfg.vocab_size]])
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        jaxkv.prefill(params, cfg, [[1]], capacity=16, prefill_chunk=-1)
    # The cache was not consumed by the failed calls.
    logits, _ = jaxkv.extend(params, cfg, cache, [[1], [2]], logits="last")
    assert np.isfinite(np.asarray(logits)).all()
    assert jax.tree.leaves(cache)[0].shape[0] == 2


def test_fused_prefill_attention_equals_jaxkv_attention(rng, monkeypatch):
    """Prefill, chunked prefill and extend through jax.nn.dot_product_attention (the default;
    XLA's implementation here) give the logits of jaxkv's own two-part attention."""
    from jaxkv import attention

    cfg, params = tiny("test-gqa")
    window_cfg = cfg.replace(sliding_window=5)
    full, (a, b) = _split_rows(rng, [[20, 3], [6, 11]], cfg.vocab_size)
    calls = []
    fused = jax.nn.dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counted)

    def run(c, use_fused):
        monkeypatch.setattr(attention, "FUSED_PREFILL", use_fused)
        jax.clear_caches()  # the form is chosen at trace time
        last, cache = jaxkv.prefill(params, c, a, capacity=64, prefill_chunk=16)
        logits, _ = jaxkv.extend(params, c, cache, b)
        return np.asarray(last), np.asarray(logits), reference_logits(params, c, full)

    try:
        for c in (cfg, window_cfg):
            own = run(c, False)
            assert not calls
            got = run(c, True)
            assert calls and set(calls) == {"xla"}
            calls.clear()
            for row in range(2):
                la, lb = len(a[row]), len(b[row])
                for x in (own, got):  # each against the forward of jaxkv's own attention
                    np.testing.assert_allclose(x[0][row], own[2][row][la - 1], atol=ATOL)
                    want = own[2][row][la : la + lb]
                    np.testing.assert_allclose(x[1][row, :lb], want, atol=ATOL)
                np.testing.assert_allclose(got[2][row], own[2][row], atol=ATOL)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
