"""One process of the two-process test (tests/test_sharding.py): joins a jax.distributed job
on localhost, builds a ('data', 'model') mesh over both processes' CPU devices, generates
greedily and writes the tokens as JSON.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax

jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=n,
        process_id=pid,
        initialization_timeout=60,
    )
    from sharding_cases import CASES, params_for, prompts_for

    import jaxkv
    from jaxkv.sharding import make_mesh, shard_params

    assert jax.device_count() == 4 * n and jax.local_device_count() == 4
    results = {}
    for name, (config, seed) in CASES.items():
        params = params_for(config, seed)
        mesh = make_mesh(2, 2 * n)
        sharded = shard_params(params, config, mesh)
        res = jaxkv.generate(sharded, config, prompts_for(config), max_new_tokens=12, mesh=mesh)
        results[name] = [[int(t) for t in row] for row in jax.device_get(res.tokens)]
    with open(out, "w") as f:
        json.dump({"process": pid, "devices": jax.device_count(), "tokens": results}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
