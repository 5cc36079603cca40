"""Configs and prompts shared by the sharding tests and the multi-process worker."""

import jax
import numpy as np

import jaxkv

CASES = {
    # MHA: 8 heads split over up to 8 model shards.
    "mha": (jaxkv.ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, ffn_dim=128), 0),
    # GQA: 16 query heads in 8 KV groups.
    "gqa": (
        jaxkv.ModelConfig(
            vocab_size=128,
            d_model=64,
            n_layers=2,
            n_heads=16,
            n_kv_heads=8,
            head_dim=8,
            ffn_dim=128,
        ),
        1,
    ),
}
LENGTHS = [1, 7, 13, 2, 16, 5, 9, 3]


def prompts_for(config, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, size=n).tolist() for n in lengths]


def params_for(config, seed):
    """Random params, scaled up so logits are peaked and greedy choices are not near-ties."""
    params = jaxkv.init_params(config, jax.random.key(seed))
    return jax.tree.map(lambda p: p * 4 if p.ndim >= 2 else p, params)
