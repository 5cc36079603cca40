"""A stateful property test: random prompts, decode steps (with rows paused), extends,
generations and resumes against a NumPy reference of which positions each cache kind holds."""

from __future__ import annotations

import numpy as np
from helpers import tiny
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import jaxkv
from jaxkv.cache import DenseLayer, HeavyLayer, RingLayer

CAPACITY = 96
BATCH = 2
KINDS = [
    None,
    jaxkv.Window(4),
    jaxkv.Window(3, sinks=2),
    (jaxkv.Window(5), jaxkv.Dense()),
    jaxkv.Heavy(3, 2),
    jaxkv.SnapKV(6, 2, kernel=3, decode="ring"),
    (jaxkv.SnapKV(5, 3), jaxkv.Heavy(1, 4)),
]


def held(length: int, layer) -> set[int]:
    """Positions a layer of this kind holds for a row of `length` tokens (the reference)."""
    if isinstance(layer, DenseLayer):
        return set(range(length))
    s, w = layer.sinks, layer.window
    return set(range(min(s, length))) | set(range(max(s, length - w), length))


class CacheMachine(RuleBasedStateMachine):
    @initialize(
        kind=st.sampled_from(KINDS), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=2)
    )
    def start(self, kind, lengths):
        self.cfg, self.params = tiny("test-gqa")
        self.rng = np.random.default_rng(sum(lengths))
        self.kind = kind
        prompts = [self.rng.integers(0, 97, n).tolist() for n in lengths]
        _, self.cache = jaxkv.prefill(self.params, self.cfg, prompts, capacity=CAPACITY, cache=kind)
        self.lengths = list(lengths)
        self.state = None

    def _room(self) -> int:
        room = self.cache.room()
        return 10**9 if room is None else room

    @precondition(lambda self: self.state is None)
    @rule(active=st.lists(st.booleans(), min_size=2, max_size=2))
    def step(self, active):
        toks = self.rng.integers(0, 97, BATCH).astype(np.int32)
        room = self._room()
        _, self.cache = jaxkv.decode_step(
            self.params, self.cfg, self.cache, toks, active=np.array(active)
        )
        if room >= 1:
            self.lengths = [n + int(a) for n, a in zip(self.lengths, active, strict=True)]

    @precondition(lambda self: self.state is None)
    @rule(sizes=st.lists(st.integers(1, 9), min_size=2, max_size=2))
    def extend(self, sizes):
        if max(sizes) > self._room():
            return
        rows = [self.rng.integers(0, 97, n).tolist() for n in sizes]
        _, self.cache = jaxkv.extend(self.params, self.cfg, self.cache, rows)
        self.lengths = [n + k for n, k in zip(self.lengths, sizes, strict=True)]

    @rule(n=st.integers(1, 12), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=2))
    def generate(self, n, lengths):
        prompts = [self.rng.integers(0, 97, k).tolist() for k in lengths]
        res = jaxkv.generate(
            self.params, self.cfg, prompts, max_new_tokens=n, capacity=CAPACITY, cache=self.kind
        )
        self.state, self.cache = res.state, res.state.cache
        self.lengths = [k + n - 1 for k in lengths]  # the last emitted token is pending

    @precondition(lambda self: self.state is not None)
    @rule(n=st.integers(1, 12))
    def resume(self, n):
        if n > self._room():
            return
        res = jaxkv.resume(self.params, self.cfg, self.state, max_new_tokens=n)
        self.state, self.cache = res.state, res.state.cache
        self.lengths = [k + n for k in self.lengths]

    @rule()
    def leave_the_loop(self):
        self.state = None

    @invariant()
    def holds_what_the_reference_holds(self):
        if not hasattr(self, "cache"):
            return
        assert np.asarray(self.cache.lengths).tolist() == self.lengths
        dense = np.asarray(self.cache.positions)
        for layer in self.cache.layers:
            if isinstance(layer, HeavyLayer):  # which older ones it keeps: test_heavy/snapkv
                for b, n in enumerate(self.lengths):
                    for head in np.asarray(layer.pos)[b]:
                        got = head[head >= 0].tolist()
                        assert len(got) == len(set(got)) == min(n, layer.slots)
                        assert set(range(max(0, n - layer.recent), n)) <= set(got) <= set(range(n))
                continue
            table = dense if isinstance(layer, DenseLayer) else np.asarray(layer.pos)
            assert isinstance(layer, (DenseLayer, RingLayer))
            for b, n in enumerate(self.lengths):
                got = table[b][table[b] >= 0].tolist()
                assert len(got) == len(set(got))
                assert set(got) == held(n, layer), (b, n, sorted(got))


CacheMachine.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMachine = CacheMachine.TestCase
