"""The `jaxkv` command line: generate (streaming), info, bench, train.

    jaxkv generate "def fibonacci(n):"        # the bundled model, streamed to the terminal
    jaxkv generate --model DIR --dtype bfloat16 "Once upon a time"
    jaxkv info [--model DIR] [--batch-size 8 --capacity 4096]
    jaxkv bench --suite cpu --out bench_out [--quick]
    jaxkv train --out DIR

Usage errors (bad flags, a missing model path) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tiny-py"


class UsageError(Exception):
    """A problem with the command line, reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_dir(path: str | None) -> Path:
    model = Path(path) if path else BUNDLED_MODEL
    if not model.is_dir():
        raise UsageError(f"model directory {model} does not exist")
    if not (model / "config.json").is_file():
        raise UsageError(f"{model} is not a model directory (no config.json)")
    return model


def _load(path: str | None, dtype: str | None) -> tuple[Any, Any, Any, Path]:
    from jaxkv.checkpoint import CheckpointError, load_pretrained
    from jaxkv.tokenizer import load_tokenizer

    model = _model_dir(path)
    try:
        config, params = load_pretrained(model, dtype=dtype, progress=sys.stderr.isatty())
        tokenizer = load_tokenizer(model)
    except (CheckpointError, ValueError) as e:
        raise UsageError(str(e)) from None
    return config, params, tokenizer, model


class _CompileClock:
    """Total XLA compile time, from jax.monitoring events."""

    def __init__(self) -> None:
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, secs: float, **_: Any) -> None:
        if name in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
        ):
            self.seconds += secs


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxkv.sampling import SamplingConfig

    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("jaxkv generate: give a PROMPT argument or pipe one on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise UsageError("jaxkv generate: the prompt is empty")
    try:
        sampling = SamplingConfig(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
        )
    except ValueError as e:
        raise UsageError(f"jaxkv generate: {e}") from None
    config, params, tokenizer, _ = _load(args.model, args.dtype)
    ids = tokenizer.encode(prompt)
    total = len(ids) + args.max_new_tokens
    if config.position == "learned" and total > config.max_seq_len:
        raise UsageError(
            f"jaxkv generate: prompt ({len(ids)} tokens) + --max-new-tokens "
            f"{args.max_new_tokens} exceeds the model's {config.max_seq_len}"
        )
    return _stream(config, params, tokenizer, prompt, ids, sampling, args)


def _stream(
    config: Any,
    params: Any,
    tokenizer: Any,
    prompt: str,
    ids: list[int],
    sampling: Any,
    args: argparse.Namespace,
) -> int:
    import numpy as np

    from jaxkv.decode import generate_stream
    from jaxkv.tokenizer import StreamDecoder

    clock = _CompileClock()
    decoders = [StreamDecoder(tokenizer) for _ in range(args.num_samples)]
    done = np.zeros(args.num_samples, bool)
    n_tokens = 0
    out = sys.stdout
    out.write(prompt)
    out.flush()
    start = time.perf_counter()
    stream = generate_stream(
        params,
        config,
        [ids] * args.num_samples,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        eos_ids=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id,
        key=args.seed,
        chunk_size=args.chunk_size,
    )
    for chunk in stream:
        for row, toks in enumerate(chunk):
            keep = []
            for t in toks:
                if done[row]:
                    break
                keep.append(int(t))
                done[row] = int(t) in tokenizer.eos_ids
            n_tokens += len(keep)
            text = decoders[row].push(keep)
            if row == 0 and text:
                out.write(text)
                out.flush()
    elapsed = time.perf_counter() - start
    out.write("\n")
    for row in range(1, args.num_samples):
        out.write(f"\n--- sample {row + 1} ---\n{prompt}{decoders[row].text}\n")
    out.flush()
    run = max(elapsed - clock.seconds, 1e-9)
    print(
        f"[jaxkv] {n_tokens} tokens in {elapsed:.2f}s: {n_tokens / run:.1f} tokens/s "
        f"excluding {clock.seconds:.2f}s of compilation",
        file=sys.stderr,
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from jaxkv.cache import cache_memory_bytes

    config, params, tokenizer, model = _load(args.model, args.dtype)
    import jax

    n_params = sum(int(p.size) for p in jax.tree.leaves(params))
    print(f"model: {model}")
    print(
        f"tokenizer: {type(tokenizer).__name__} (vocab {tokenizer.vocab_size}, eos "
        f"{list(tokenizer.eos_ids)}, pad {tokenizer.pad_id})"
    )
    print("config:")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    mib = n_params * jax.numpy.dtype(config.dtype).itemsize / 2**20
    print(f"parameters: {n_params:,} ({mib:.1f} MiB in {config.dtype})")
    nbytes = cache_memory_bytes(config, args.batch_size, args.capacity)
    print(
        f"KV cache for batch {args.batch_size} x capacity {args.capacity}: {nbytes:,} bytes "
        f"({nbytes / 2**20:.2f} MiB)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxkv", description="Fast decoding with an explicit KV cache.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text, streamed as it is made")
    gen.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    gen.add_argument("--model", help="a model directory (default: the bundled model)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=_positive_int, default=1)
    gen.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=8,
        help="decode steps per compiled chunk between screen updates",
    )
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="config, parameter count and KV-cache memory")
    info.add_argument("--model", help="a model directory (default: the bundled model)")
    info.add_argument("--batch-size", type=_positive_int, default=1)
    info.add_argument("--capacity", type=_positive_int, default=2048)
    info.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    info.set_defaults(func=cmd_info)

    sub.add_parser("bench", help="benchmark suites (jaxkv bench --help)", add_help=False)
    sub.add_parser("train", help="train the bundled model (jaxkv train --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench and train have parsers of their own: hand them the rest of the line.
    if argv and argv[0] == "bench":
        from jaxkv.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "train":
        from jaxkv.train import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as e:
        message = str(e)
        print(message if message.startswith("jaxkv") else f"jaxkv: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
