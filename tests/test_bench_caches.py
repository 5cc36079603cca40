"""The cache benchmarks run end to end on tiny models (numbers meaningless, relations real):
a ring streams 16x its size with every token emitted and constant bytes, every policy is
scored, the hybrid pattern keeps ~5x less K/V, and the report renders."""

from __future__ import annotations

import importlib.util
import math

from jaxkv.bench import caches


def test_cache_benchmarks_smoke(tmp_path):
    out = caches.run(quick=True, smoke=True, out_dir=tmp_path)
    st = out["streaming"]
    assert st["emitted"] == st["generated"] == 16 * st["ring_slots"]
    assert st["cache_bytes_start"] == st["cache_bytes_end"]
    assert math.isfinite(out["streaming_step_ratio"]) and out["streaming_step_ratio"] > 0
    policies = {r["policy"] for r in out["ppl_under_budget"]}
    assert policies == {
        "full",
        "window",
        "sinks+window (cache positions)",
        "sinks+window (original positions)",
        "recompute",
    }
    assert all(1 < r["ppl"] < 1e4 for r in out["ppl_under_budget"])
    assert 4.5 < out["hybrid_memory_ratio"] < 6
    assert out["cost_per_step"]["isolated_steps_sum_s"] > 0
    quant = {(r["dtype"], r["scales"]): r for r in out["kv_quant"]}
    f32, head = quant[("float32", "-")], "per token and KV head"
    int8, int4 = quant[("int8", head)], quant[("int4", head)]
    assert int8["bytes_per_token"] < f32["bytes_per_token"] / 3
    assert int4["bytes_per_token"] < int8["bytes_per_token"]
    assert int8["top1_agreement"] > 0.9 and abs(int8["ppl_delta"]) < 0.1
    assert quant[("int8", "per token")]["bytes_per_token"] < int8["bytes_per_token"]
    assert len(quant) == 11  # float, and 5 layouts of int8 and of int4
    assert out["kv_quant_step_ratio"] > 0
    (over,) = out["score_overhead"]
    assert over["h2o_over_ring"] > 0 and set(over["step_ms"]) == {"ring", "h2o", "snapkv+ring"}
    ev = {(r["protocol"], r["policy"], r["budget_fraction"]) for r in out["eviction_ppl"]}
    stream = ("h2o", "sinks+window", "window", "random")
    prompt = (*stream, "snapkv+window", "snapkv+h2o")
    want = {("stream", "full", 1.0), ("prompt", "full", 1.0)}
    want |= {("stream", p, f) for p in stream for f in (0.2, 0.5)}
    want |= {("prompt", p, f) for p in prompt for f in (0.2, 0.5)}
    assert ev == want
    assert "Eviction policies at a budget" in caches.markdown(out)
    # The plot needs matplotlib (the bench extra; the test extra does without it).
    has_plotting = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "ppl_bundled.png").exists() == has_plotting
    assert (tmp_path / "eviction_bundled.png").exists() == has_plotting
    md = caches.markdown(out)
    assert "Perplexity under a budget" in md and "sinks+window (cache positions)" in md
