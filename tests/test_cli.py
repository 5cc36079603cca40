"""The `jaxkv` command line, end to end on the bundled model (as subprocesses) and its usage
errors (in process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxkv import cli

BUNDLED = cli.BUNDLED_MODEL


def _run(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxkv.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_streams_python_like_text_incrementally():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxkv.cli",
            "generate",
            "def fibonacci(n):",
            "--max-new-tokens",
            "96",
            "--chunk-size",
            "8",
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    chunks = []  # (bytes, process still running when they arrived)
    fd = proc.stdout.fileno()
    while True:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append((data, proc.poll() is None))
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err
    text = b"".join(c for c, _ in chunks).decode()
    assert text.startswith("def fibonacci(n):")
    # More than one piece of output arrived while the process was still generating.
    assert sum(1 for _, running in chunks if running) >= 2, chunks
    assert len(text) > len("def fibonacci(n):") + 40
    assert "tokens/s" in err and "compilation" in err


def test_fixed_seed_gives_same_text_and_stdin_prompt():
    args = ["generate", "--max-new-tokens", "40", "--seed", "7", "--temperature", "0.9"]
    a = _run(*args, "import os\n")
    b = _run(*args, stdin="import os\n")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout
    c = _run(*args[:-3], "--seed", "8", "--temperature", "0.9", "import os\n")
    assert c.stdout != a.stdout


def test_info_reports_config_params_and_cache_memory():
    out = _run("info", "--batch-size", "4", "--capacity", "1024")
    assert out.returncode == 0, out.stderr
    assert "parameters:" in out.stdout and "n_layers: 4" in out.stdout
    # 2 * layers 4 * batch 4 * capacity 1024 * kv_heads 4 * head_dim 32 * 4 bytes + positions
    assert f"{2 * 4 * 4 * 1024 * 4 * 32 * 4 + 4 * 4 * 1024 + 4 * 4 + 4:,} bytes" in out.stdout


def test_info_reports_memory_per_cache_kind(capsys):
    assert cli.main(["info", "--capacity", "1024", "--window", "60", "--sinks", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 x ring(window=60, sinks=4, cache)" in out and "RingLayer:" in out
    assert cli.main(["info", "--h2o", "48,16", "--kv-dtype", "float32"]) == 0
    assert "4 x h2o(heavy=48, recent=16)" in capsys.readouterr().out
    assert cli.main(["info", "--snapkv", "64,16", "--snapkv-decode", "ring"]) == 0
    assert "4 x snapkv(budget=64, window=16, kernel=7, decode=ring)" in capsys.readouterr().out
    assert cli.main(["info", "--kv-dtype", "int8", "--kv-scales", "kivi", "--kv-residual"]) == 0
    assert "KV cache for batch" in capsys.readouterr().out
    assert cli.main(["info", "--capacity", "1024", "--kv-dtype", "int8"]) == 0
    # int8 K/V + a float32 scale per token and head: 4 layers * 4 heads * (2 * 32 + 8) bytes
    assert f"{1024 * (4 * 4 * (2 * 32 + 8)) + 4 * 1024 + 8:,} bytes" in capsys.readouterr().out


def test_bad_flags_exit_2_with_one_line_subprocess():
    out = _run("generate", "x", "--temperature", "-1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "jaxkv generate: temperature must be a number >= 0, got -1.0"
    ]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "x", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["generate", "x", "--max-new-tokens", "0"], "expected a positive integer, got 0"),
        (["generate", "x", "--max-new-tokens", "ten"], "expected a positive integer, got 'ten'"),
        (
            ["generate", "x", "--model", "/no/such/dir"],
            "model directory /no/such/dir does not exist",
        ),
        (["generate", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "x", "--min-p", "1"], "min_p must be in [0, 1), got 1.0"),
        (["info", "--capacity", "-5"], "expected a positive integer, got -5"),
        (["generate", "x", "--h2o", "3"], "--h2o takes HEAVY,RECENT"),
        (["generate", "x", "--sinks", "4"], "--sinks needs --window"),
        (["generate", "x", "--window", "8", "--h2o", "4,4"], "give one of --window, --h2o"),
        (["generate", "x", "--snapkv", "64", "--h2o", "4,4"], "['h2o', 'snapkv']"),
        (["generate", "x", "--snapkv", "16"], "SnapKV.window (32) must be smaller"),
        (["generate", "x", "--snapkv", "64,8,2"], "--snapkv takes BUDGET[,WINDOW]"),
        (["generate", "x", "--kv-scales", "kivi"], "need --kv-dtype int8 or int4, got"),
        (
            ["generate", "x", "--kv-dtype", "int8", "--kv-residual", "--window", "64"],
            "only dense layers have",
        ),
        (["info", "--window", "8", "--sinks", "-1"], "Window.sinks must be >= 0"),
        (["frobnicate"], "invalid choice"),
        ([], "required: command"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_model_without_config_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["info", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_bundled_model_ships_in_the_package():
    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "byte_tokenizer.json", "training.json"} <= names
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size <= 25 * 2**20


def test_greedy_cli_output_equals_library_generate():
    import numpy as np

    import jaxkv
    from jaxkv.checkpoint import load_pretrained
    from jaxkv.tokenizer import load_tokenizer

    out = _run("generate", "class Stack:", "--max-new-tokens", "64", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    config, params = load_pretrained(BUNDLED)
    tok = load_tokenizer(BUNDLED)
    res = jaxkv.generate(
        params,
        config,
        [tok.encode("class Stack:")],
        max_new_tokens=64,
        eos_ids=tok.eos_ids,
        pad_id=tok.pad_id,
    )
    ids = np.asarray(res.tokens[0, : int(res.lengths[0])])
    assert out.stdout == "class Stack:" + tok.decode(ids) + "\n"
