"""Test helpers: tiny models, the naive reference decoder, compile counting."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import jaxkv

ATOL = 1e-5


@functools.cache
def tiny(name: str, seed: int = 0) -> tuple[jaxkv.ModelConfig, dict]:
    """A preset config and random float32 params for it (cached across tests)."""
    cfg = jaxkv.preset(name)
    return cfg, jaxkv.init_params(cfg, jax.random.key(seed))


@functools.cache
def tiny_cfg(seed: int = 0, **overrides) -> tuple[jaxkv.ModelConfig, dict]:
    cfg = jaxkv.preset("test-gqa").replace(**overrides)
    return cfg, jaxkv.init_params(cfg, jax.random.key(seed))


def naive_greedy(params, cfg, prompt, n: int) -> list[int]:
    """The reference decoder: re-run the uncached forward on the growing sequence."""
    seq = list(prompt)
    width = 64 * (-(-(len(prompt) + n) // 64))  # a fixed width: one compile for the loop
    for _ in range(n):
        tokens = np.zeros((1, width), np.int32)
        positions = np.full((1, width), -1, np.int32)
        tokens[0, : len(seq)] = seq
        positions[0, : len(seq)] = np.arange(len(seq))
        logits = jaxkv.forward(params, cfg, tokens, positions)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


def reference_logits(params, cfg, seqs, pad_to: int = 64) -> list[np.ndarray]:
    """Uncached `forward` logits of each sequence, [len(seq), vocab] each.

    The sequences are right-padded to `pad_to` and run as one batch (one compile); a real token
    never attends to later padding, so each row equals that sequence run alone (which
    tests/test_model.py checks)."""
    width = max(pad_to, max(len(s) for s in seqs))
    tokens = np.zeros((len(seqs), width), np.int32)
    positions = np.full((len(seqs), width), -1, np.int32)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
        positions[b, : len(s)] = np.arange(len(s))
    logits = np.asarray(jaxkv.forward(params, cfg, tokens, positions))
    return [logits[b, : len(s)] for b, s in enumerate(seqs)]


def random_prompts(rng: np.random.Generator, lengths, vocab: int) -> list[list[int]]:
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False

    def __call__(self, name: str, *args, **kwargs) -> None:
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COUNTER = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(_COUNTER)


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCounter]:
    _COUNTER.count = 0
    _COUNTER.active = True
    try:
        yield _COUNTER
    finally:
        _COUNTER.active = False
