"""Sharded generation on 8 host CPU devices (see conftest.py) and across two processes:
the same tokens as one device, logits within float32 tolerance, no resharding of the cache."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharding_cases import CASES, params_for, prompts_for

import jaxkv
from jaxkv.loops import Loop, decode_step_jit
from jaxkv.sharding import make_mesh, rules_for, shard_params

MESHES = [(8, 1), (2, 4), (1, 8)]
N_NEW = 12
TOL = 1e-5

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py)")


def _single(name):
    config, seed = CASES[name]
    params = params_for(config, seed)
    prompts = prompts_for(config)
    res = jaxkv.generate(params, config, prompts, max_new_tokens=N_NEW)
    logits, cache = jaxkv.prefill(params, config, prompts, capacity=32)
    step, _ = jaxkv.decode_step(params, config, cache, jnp.argmax(logits, -1))
    return config, params, prompts, res, logits, step


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_generate_equals_one_device(name, shape):
    config, params, prompts, ref, ref_logits, ref_step = _single(name)
    mesh = make_mesh(*shape)
    sharded = shard_params(params, config, mesh)
    # The weights really are split: a qkv shard holds 1/model of the KV heads.
    qkv = sharded["layers_0"]["attn"]["qkv"]
    assert qkv.addressable_shards[0].data.shape[1] == config.n_kv_heads // shape[1]
    res = jaxkv.generate(sharded, config, prompts, max_new_tokens=N_NEW, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(res.lengths), np.asarray(ref.lengths))
    logits, cache = jaxkv.prefill(sharded, config, prompts, capacity=32, mesh=mesh)
    k0 = cache.layers[0].k  # [B, n_kv_heads, head_dim, capacity]: rows on data, heads on model
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    assert k0.sharding.is_equivalent_to(want, k0.ndim)
    assert cache.layers[0].v.sharding.is_equivalent_to(want, k0.ndim)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=TOL, rtol=0)
    step, cache = jaxkv.decode_step(sharded, config, cache, jnp.argmax(logits, -1), mesh=mesh)
    np.testing.assert_allclose(np.asarray(step), np.asarray(ref_step), atol=TOL, rtol=0)
    assert cache.layers[0].k.sharding.is_equivalent_to(want, k0.ndim)


def test_indivisible_kv_heads_fall_back_to_replicated_attention():
    config = jaxkv.ModelConfig(
        vocab_size=98, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=128
    )
    params = params_for(config, 3)
    prompts = prompts_for(config)
    ref = jaxkv.generate(params, config, prompts, max_new_tokens=N_NEW)
    mesh = make_mesh(2, 4)
    with pytest.warns(UserWarning, match=r"does not divide n_kv_heads=2, vocab_size=98"):
        sharded = shard_params(params, config, mesh)
    assert sharded["layers_0"]["attn"]["qkv"].addressable_shards[0].data.shape[1] == 2
    assert sharded["layers_0"]["mlp"]["wi"].addressable_shards[0].data.shape[2] == 128 // 4
    with pytest.warns(UserWarning):
        res = jaxkv.generate(sharded, config, prompts, max_new_tokens=N_NEW, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ref.tokens))


def test_batch_not_divisible_by_data_axis_is_an_error():
    config, seed = CASES["mha"]
    params = shard_params(params_for(config, seed), config, make_mesh(4, 2))
    with pytest.raises(
        ValueError,
        match=r"batch size 6 is not divisible by the mesh's 'data' "
        r"axis \(4\)",
    ):
        jaxkv.generate(
            params, config, prompts_for(config)[:6], max_new_tokens=2, mesh=make_mesh(4, 2)
        )


def test_bad_meshes():
    with pytest.raises(ValueError, match=r"mesh \(3, 2\) needs 6 devices, but 8 are given"):
        make_mesh(3, 2)
    config, _ = CASES["mha"]
    wrong = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    with pytest.raises(ValueError, match="mesh axes must be"):
        rules_for(config, wrong)


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements of its result) for every collective in an HLO module."""
    out = []
    for line in hlo.splitlines():
        m = re.search(
            r"=\s*\(?([a-z0-9]+)\[([\d,]*)\][^=]*?\s(all-gather|all-reduce|"
            r"all-to-all|collective-permute|reduce-scatter)(-start)?\(",
            line,
        )
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            out.append((m.group(3), int(np.prod(dims)) if dims else 1))
    return out


def test_decode_step_never_moves_the_cache():
    """The compiled decode step on a (2, 4) mesh communicates only activation-sized arrays:
    no collective is anywhere near the size of one cache shard."""
    config, seed = CASES["gqa"]
    mesh = make_mesh(2, 4)
    params = shard_params(params_for(config, seed), config, mesh)
    _, cache = jaxkv.prefill(params, config, prompts_for(config), capacity=256, mesh=mesh)
    rules = rules_for(config, mesh)
    tokens = jax.device_put(np.zeros(8, np.int32), rules.named(jax.sharding.PartitionSpec("data")))
    active = jax.device_put(np.ones(8, bool), rules.named(jax.sharding.PartitionSpec("data")))
    hlo = (
        decode_step_jit.lower(params, cache, tokens, active, loop=Loop(config=config, rules=rules))
        .compile()
        .as_text()
    )
    shard = cache.layers[0].k.addressable_shards[0].data.size  # 4 * 2 * 8 * 256
    ops = _collectives(hlo)
    assert ops, "a model-parallel step must communicate"
    assert max(n for _, n in ops) * 16 <= shard, ops
    assert {op for op, _ in ops} <= {"all-reduce", "all-gather"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_generate_the_same_tokens(tmp_path):
    worker = Path(__file__).with_name("multiprocess_worker.py")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(worker.parent), env.get("PYTHONPATH", "")])
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), "2", str(port), str(o)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, o in enumerate(outs)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:  # never leave a worker behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for out in outs:
        got = json.loads(out.read_text())
        assert got["devices"] == 8
        for name in CASES:
            ref = _single(name)[3]
            assert got["tokens"][name] == np.asarray(ref.tokens).tolist(), name
