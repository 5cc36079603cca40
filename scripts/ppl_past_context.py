"""The full suite's real-model perplexity under a budget, alone: SmolLM2-135M-Instruct on
9216 tokens of English prose (past its 8192-token training context), cache 1/8 of the text,
each policy token by token. Writes bench.json, bench.md and a plot to --out."""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxkv.bench import caches
from jaxkv.bench.common import env_info
from jaxkv.evaluation import eval_text

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=9216)
p.add_argument("--recompute-stride", type=int, default=128)
p.add_argument("--out", default="benchmarks/caches/smollm2_9216")
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
config, params, tok = caches._real_model()
ids = np.asarray(tok.encode(eval_text()))
if len(ids) < args.tokens:
    raise SystemExit(f"the text has {len(ids)} tokens, fewer than {args.tokens}")
ids = ids[: args.tokens]
rows, curves = caches.ppl_under_budget(
    config, params, ids, args.tokens // 8, "SmolLM2-135M (prose)", args.recompute_stride
)
caches.plot_curves(
    curves, f"SmolLM2-135M, cache {args.tokens // 8} of {args.tokens}", out / "ppl_smollm2.png", 64
)
segments = {}
for name, nll in curves.items():  # perplexity before and past the 8k context
    segments[name] = {
        "ppl_first_8192": float(np.exp(nll[:8191].mean())),
        "ppl_past_8192": float(np.exp(nll[8191:].mean())),
    }
result = {
    "env": env_info(),
    "ppl_under_budget": rows,
    "by_segment": segments,
    "total_s": time.perf_counter() - t0,
}
(out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
print(json.dumps(result["ppl_under_budget"], indent=1))
print(json.dumps(segments, indent=1))
