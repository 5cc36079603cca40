"""Generate from a small RANDOM-WEIGHT model: shows the data path end to end, not a real model.

python scripts/demo_random.py
"""

from __future__ import annotations

import time

import jax
import numpy as np

import jaxkv


def main() -> None:
    config = jaxkv.preset("llama-3m")
    params = jaxkv.init_params(config, jax.random.key(0))
    prompts = [[1, 2, 3, 4, 5], [42, 7], list(range(100, 131))]
    sampling = jaxkv.SamplingConfig(temperature=0.8, top_k=50, top_p=0.95)
    print(f"model: llama-3m with random weights ({config.param_count() / 1e6:.1f}M params)")
    t0 = time.perf_counter()
    out = jaxkv.generate(params, config, prompts, max_new_tokens=32, sampling=sampling, key=0)
    out.tokens.block_until_ready()
    t1 = time.perf_counter()
    out = jaxkv.generate(params, config, prompts, max_new_tokens=32, sampling=sampling, key=1)
    out.tokens.block_until_ready()
    t2 = time.perf_counter()
    for p, toks in zip(prompts, np.asarray(out.tokens), strict=True):
        print(f"prompt {p[:6]}{'...' if len(p) > 6 else ''} -> {toks.tolist()}")
    n = int(np.asarray(out.lengths).sum())
    print(
        f"first call (compile + run): {t1 - t0:.2f}s; second call: {t2 - t1:.3f}s, "
        f"{n / (t2 - t1):.0f} tokens/s on {jax.devices()[0].platform}"
    )


if __name__ == "__main__":
    main()
