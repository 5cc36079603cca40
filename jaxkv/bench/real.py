"""The real-model suite (`jaxkv bench --suite real`): SmolLM2-135M-Instruct from its GGUF.

- start-up: `jaxkv generate` run as a new process, with the persistent compilation cache cold,
  warm, and turned off, and where the time of a start goes (import, GGUF load, tokenizer);
- perplexity of the real text (`jaxkv.evaluation.eval_text`) with the full cache, token by token;
- greedy tokens/s against transformers (float32, the same GGUF) on the same prompt, with the
  tokens checked equal;
- a long prefill in chunks: time and peak memory (the compiled program's scratch, and the
  process's peak resident memory) of a 16k-token prompt.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

import jaxkv
from jaxkv.paths import FETCH_COMMAND, smollm2_path


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cli_run(path: str, cache_dir: str, no_cache: bool) -> dict[str, float]:
    env = {**os.environ, "JAXKV_CACHE_DIR": cache_dir}
    cmd = [
        sys.executable,
        "-m",
        "jaxkv.cli",
        "generate",
        "The capital of France is",
        "--model",
        path,
        "--max-new-tokens",
        "32",
        "--temperature",
        "0",
    ]
    if no_cache:
        cmd.append("--no-compile-cache")
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t
    m = re.search(r"excluding ([0-9.]+)s of compilation", run.stderr)
    return {"wall_s": wall, "compile_s": float(m.group(1)) if m else float("nan")}


def startup(path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        cold = _cli_run(path, d, no_cache=False)
        warm = _cli_run(path, d, no_cache=False)
    with tempfile.TemporaryDirectory() as d:
        off = _cli_run(path, d, no_cache=True)
    with tempfile.TemporaryDirectory() as d:  # converted once to safetensors, cache warm
        from jaxkv.gguf_checkpoint import convert_gguf

        converted = str(convert_gguf(path, os.path.join(d, "hf")))
        _cli_run(converted, d, no_cache=False)
        conv = _cli_run(converted, d, no_cache=False)
    code = "import time; t=time.perf_counter(); import jaxkv; print(time.perf_counter()-t)"
    imp = float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )
    from jaxkv.gguf_checkpoint import _parse

    _parse.cache_clear()  # a new process parses the file once
    t = time.perf_counter()
    jaxkv.load_pretrained(path)
    load = time.perf_counter() - t
    t = time.perf_counter()
    jaxkv.load_tokenizer(path)
    tok = time.perf_counter() - t
    return {
        "cold_cache": cold,
        "warm_cache": warm,
        "no_cache": off,
        "converted_warm": conv,
        "import_s": imp,
        "gguf_load_s": load,
        "tokenizer_s": tok,
    }


def _hf_model(path: str) -> Any:
    import torch
    import transformers

    d, f = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval()


def tokens_per_s(path: str, params: Any, config: Any, tok: Any, n: int) -> dict[str, Any]:
    import torch

    from jaxkv.chat import render_chat

    prompt = tok.encode(
        render_chat(
            tok.chat_template,
            [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        )
    )
    run = lambda: jaxkv.generate(params, config, [prompt], max_new_tokens=n).tokens
    jax.block_until_ready(run())
    times = []
    for _ in range(3):
        t = time.perf_counter()
        out = jax.block_until_ready(run())
        times.append(time.perf_counter() - t)
    ours = np.asarray(out[0]).tolist()
    model = _hf_model(path)
    hf_times = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )
        hf_times.append(time.perf_counter() - t)
    theirs = ref[0, len(prompt) :].tolist()
    return {
        "new_tokens": n,
        "prompt_tokens": len(prompt),
        "jaxkv_s": min(times),
        "transformers_s": min(hf_times),
        "jaxkv_tok_s": n / min(times),
        "transformers_tok_s": n / min(hf_times),
        "ratio": min(hf_times) / min(times),
        "same_tokens": ours == theirs,
        "threads": torch.get_num_threads(),
    }


def long_prefill(params: Any, config: Any, ids: list[int], n: int, chunk: int) -> dict[str, Any]:
    """One prefill of n tokens in chunks: compiled ahead (timed apart), then run once."""
    from jaxkv.decode import _layout
    from jaxkv.loops import Loop, prefill_jit

    batch = _layout([np.asarray(ids[:n])], n, 0)
    t = time.perf_counter()
    loop = Loop(config=config, capacity=n, cache_dtype=None, chunk=chunk)
    compiled = prefill_jit.lower(params, batch.tokens, batch.positions, None, loop=loop).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    t = time.perf_counter()
    logits, cache = compiled(params, batch.tokens, batch.positions, None)
    jax.block_until_ready(logits)
    run = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kv = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    return {
        "tokens": n,
        "chunk": chunk,
        "time_s": run,
        "compile_s": compile_s,
        "tokens_per_s": n / run,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "kv_cache_bytes": int(kv),
        "peak_rss_bytes": int(rss),
        "one_shot_scores_bytes_per_layer": config.n_heads * n * n * 4,
    }


def run(quick: bool, smoke: bool = False) -> dict[str, Any]:
    path = smollm2_path()
    if not path.is_file():
        raise SystemExit(f"the real model is not at {path}; run `{FETCH_COMMAND}`")
    jax.config.update("jax_default_matmul_precision", "highest")
    out: dict[str, Any] = {"model": str(path)}
    _log("start-up (three new processes)")
    out["startup"] = startup(str(path))
    _log(f"start-up: {out['startup']}")
    config, params = jaxkv.load_pretrained(path)
    tok = jaxkv.load_tokenizer(path)
    from jaxkv.evaluation import eval_text, perplexity

    ids = tok.encode(eval_text())
    n_ppl = 256 if smoke else (1024 if quick else 4096)
    t = time.perf_counter()
    ppl, _nll = perplexity(params, config, ids[:n_ppl])
    out["perplexity"] = {
        "tokens": n_ppl,
        "ppl": ppl,
        "text_tokens": len(ids),
        "python": sys.version.split()[0],
        "time_s": time.perf_counter() - t,
    }
    _log(f"perplexity: {out['perplexity']}")
    out["tokens_per_s"] = tokens_per_s(str(path), params, config, tok, 16 if smoke else 128)
    _log(f"tokens/s: {out['tokens_per_s']}")
    n_long = 1024 if smoke else (4096 if quick else 16384)
    out["long_prefill"] = long_prefill(params, config, ids, n_long, 512)
    _log(f"long prefill: {out['long_prefill']}")
    return out


def markdown(r: dict[str, Any]) -> str:
    s, p, t, lp = r["startup"], r["perplexity"], r["tokens_per_s"], r["long_prefill"]
    gib = 2**30
    return "\n".join(
        [
            "## Real model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
            "",
            "| start-up of `jaxkv generate` (32 tokens) | wall s | compile s |",
            "| --- | --- | --- |",
            *[
                f"| compile cache {name} | {s[key]['wall_s']:.1f} | {s[key]['compile_s']:.1f} |"
                for name, key in (
                    ("cold", "cold_cache"),
                    ("warm", "warm_cache"),
                    ("off", "no_cache"),
                )
            ],
            "",
            f"Of a start: import jaxkv {s['import_s']:.2f} s, GGUF parse + dequantize "
            f"{s['gguf_load_s']:.2f} s, tokenizer from the parsed file {s['tokenizer_s']:.2f} s.",
            "",
            f"Perplexity, full cache, token by token, first {p['tokens']} tokens of the real text "
            f"(Python {p['python']}'s pydoc topics, {p['text_tokens']} tokens): "
            f"**{p['ppl']:.2f}**.",
            "",
            f"Greedy decode, {t['prompt_tokens']}-token chat prompt + {t['new_tokens']} tokens: "
            f"jaxkv {t['jaxkv_tok_s']:.1f} tokens/s, transformers {t['transformers_tok_s']:.1f} "
            f"tokens/s (torch {t['threads']} threads): **{t['ratio']:.2f}x**; same tokens: "
            f"{t['same_tokens']}.",
            "",
            f"Prefill of {lp['tokens']} tokens in chunks of {lp['chunk']}: {lp['time_s']:.1f} s "
            f"(+ {lp['compile_s']:.1f} s compiling) "
            f"({lp['tokens_per_s']:.0f} tokens/s); compiled scratch memory "
            f"{lp['temp_bytes'] / gib:.2f} GiB (one-shot scores alone would be "
            f"{lp['one_shot_scores_bytes_per_layer'] / gib:.1f} GiB per layer); process peak RSS "
            f"{lp['peak_rss_bytes'] / gib:.2f} GiB.",
            "",
        ]
    )
