"""What one sharded decode step communicates: the collectives in the compiled program, with
their result sizes in bytes (per device). Compiles only (no memory for the weights).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python scripts/sharding_comm.py --config llama-7b --mesh 2x4 --batch 8 --capacity 2048
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np

import jaxkv
from jaxkv.cache import KVCache
from jaxkv.loops import Loop, decode_step_jit
from jaxkv.model import Transformer
from jaxkv.sharding import cache_specs, make_mesh, param_shardings, rules_for

_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "u32": 4, "f16": 2}


def collectives(hlo: str) -> list[tuple[str, str, int]]:
    """(op, result type, bytes) of every collective in an HLO module."""
    out = []
    pattern = (
        r"=\s*\(?([a-z0-9]+)\[([\d,]*)\][^=]*?\s(all-gather|all-reduce|all-to-all|"
        r"collective-permute|reduce-scatter)(-start)?\("
    )
    for line in hlo.splitlines():
        m = re.search(pattern, line)
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            n = int(np.prod(dims)) if dims else 1
            out.append((m.group(3), f"{m.group(1)}[{m.group(2)}]", n * _BYTES.get(m.group(1), 4)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="llama-7b")
    ap.add_argument("--mesh", default="2x4", help="DATAxMODEL")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=2048)
    args = ap.parse_args()
    config = jaxkv.preset(args.config)
    data, model = (int(x) for x in args.mesh.split("x"))
    mesh = make_mesh(data, model)
    rules = rules_for(config, mesh)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda k: Transformer(config).init(k, tokens, tokens)["params"], jax.random.key(0)
    )
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, config.jnp_dtype), shapes)
    shardings = param_shardings(shapes, rules)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    cache = jax.eval_shape(lambda: KVCache.init(config, args.batch, args.capacity))
    specs = cache_specs(rules)

    def with_sharding(path, s):
        name = getattr(path[-1], "name", getattr(path[-1], "key", ""))
        spec = specs["kv"] if name in ("k", "v") else specs.get(name, specs["index"])
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rules.named(spec))

    cache = jax.tree_util.tree_map_with_path(with_sharding, cache)
    rows = rules.named(jax.sharding.PartitionSpec("data"))
    toks = jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=rows)
    active = jax.ShapeDtypeStruct((args.batch,), jnp.bool_, sharding=rows)
    hlo = (
        decode_step_jit.lower(params, cache, toks, active, loop=Loop(config=config, rules=rules))
        .compile()
        .as_text()
    )
    ops = collectives(hlo)
    print(
        f"{args.config} on mesh ({data}, {model}), batch {args.batch}, capacity "
        f"{args.capacity}: {len(ops)} collectives per decode step"
    )
    count = collections.Counter((op, shape) for op, shape, _ in ops)
    size = {(op, shape): b for op, shape, b in ops}
    for (op, shape), n in sorted(count.items(), key=lambda kv: -kv[1] * size[kv[0]]):
        print(f"  {n:4d} x {op:18s} {shape:24s} {size[(op, shape)]:>12,} bytes each")
    print(f"  total {sum(b for _, _, b in ops):,} bytes of collective results per device")


if __name__ == "__main__":
    main()
