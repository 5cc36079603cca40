"""The `jaxkv` command line: generate (streaming), chat, info, convert, bench, train.

    jaxkv generate "def fibonacci(n):"        # the bundled model, streamed to the terminal
    jaxkv generate --model DIR_OR_GGUF --dtype bfloat16 "Once upon a time"
    jaxkv chat [--model DIR_OR_GGUF]           # default: the real model fetched at set-up
    jaxkv info [--model DIR] [--batch-size 8 --capacity 4096]
    jaxkv convert IN.gguf OUT_DIR
    jaxkv bench --suite cpu --out bench_out [--quick]
    jaxkv train --out DIR

Compiled programs are kept in a persistent XLA cache (~/.cache/jaxkv/xla, or under
$JAXKV_CACHE_DIR), so a second run compiles nothing; `--no-compile-cache` or
JAXKV_NO_COMPILE_CACHE=1 turns it off.

Usage errors (bad flags, a missing model path) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
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
    """A model directory or a GGUF file (default: the bundled model)."""
    model = Path(path) if path else BUNDLED_MODEL
    if model.is_file():
        return model
    if not model.is_dir():
        raise UsageError(f"model directory {model} does not exist")
    if not (model / "config.json").is_file():
        raise UsageError(f"{model} is not a model directory (no config.json)")
    return model


def enable_compile_cache(enabled: bool = True) -> Path | None:
    """Turn on JAX's persistent compilation cache in jaxkv's cache directory (unless disabled
    here or by JAXKV_NO_COMPILE_CACHE=1). Every compile is kept, however quick."""
    if not enabled or os.environ.get("JAXKV_NO_COMPILE_CACHE", "") not in ("", "0"):
        return None
    import jax

    from jaxkv.paths import compile_cache_dir

    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


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
    kind = _cache_kind(args, "jaxkv generate")
    config, params, tokenizer, _ = _load(args.model, args.dtype)
    ids = tokenizer.encode(prompt)
    from jaxkv.decode import default_capacity

    capacity = default_capacity(len(ids), args.max_new_tokens)
    _check_storage(config, kind, _kv_dtype(args, "jaxkv generate"), capacity, "jaxkv generate")
    total = len(ids) + args.max_new_tokens
    if config.position == "learned" and total > config.max_seq_len and kind is None:
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
        cache=_cache_kind(args, "jaxkv generate"),
        cache_dtype=_kv_dtype(args, "jaxkv generate"),
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


def _check_storage(config: Any, kind: Any, dtype: Any, capacity: int, command: str) -> None:
    """A usage error if the layers `kind` picks (at `capacity`) cannot store `dtype`."""
    from jaxkv.cache import layer_kinds
    from jaxkv.cache.kvcache import check_storage

    try:
        check_storage(layer_kinds(config, kind, capacity), dtype)
    except ValueError as e:
        raise UsageError(f"{command}: {e}") from None


def _kv_dtype(args: argparse.Namespace, command: str) -> Any:
    """The cache dtype --kv-dtype / --kv-scales / --kv-group / --kv-residual pick."""
    from jaxkv.cache.quant import QUANTIZED, KVQuant

    layout = args.kv_scales != "head" or args.kv_residual or args.kv_group != 32
    if not layout:
        return args.kv_dtype
    if args.kv_dtype not in QUANTIZED:
        raise UsageError(
            f"{command}: --kv-scales / --kv-group / --kv-residual need --kv-dtype int8 or int4, "
            f"got --kv-dtype {args.kv_dtype}"
        )
    try:
        return KVQuant(args.kv_dtype, args.kv_scales, args.kv_group, args.kv_residual)
    except ValueError as e:
        raise UsageError(f"{command}: {e}") from None


def _cache_kind(args: argparse.Namespace, command: str) -> Any:
    """The cache kind the --window / --sinks / --sink-positions / --h2o / --snapkv flags pick
    (None: the model's own layers decide)."""
    from jaxkv.cache import Heavy, SnapKV, Window

    picked = [f for f in ("window", "h2o", "snapkv") if getattr(args, f) is not None]
    if len(picked) > 1:
        raise UsageError(f"{command}: give one of --window, --h2o, --snapkv, not {picked}")
    if args.snapkv is not None:
        try:
            budget, *window = (int(x) for x in args.snapkv.split(","))
            if len(window) > 1:
                raise ValueError(f"{args.snapkv!r} has more than two numbers")
            return SnapKV(budget, *window, decode=args.snapkv_decode)
        except ValueError as e:
            raise UsageError(f"{command}: --snapkv takes BUDGET[,WINDOW] (ints): {e}") from None
    if args.h2o is not None:
        try:
            heavy, recent = (int(x) for x in args.h2o.split(","))
            return Heavy(heavy, recent)
        except ValueError as e:
            raise UsageError(f"{command}: --h2o takes HEAVY,RECENT (ints): {e}") from None
    if args.window is None:
        if args.sinks:
            raise UsageError(f"{command}: --sinks needs --window")
        return None
    try:
        return Window(args.window, sinks=args.sinks, positions=args.sink_positions)
    except ValueError as e:
        raise UsageError(f"{command}: {e}") from None


def cmd_info(args: argparse.Namespace) -> int:
    from jaxkv.cache import KVCache, cache_memory_bytes

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
    kind = _cache_kind(args, "jaxkv info")
    dt = _kv_dtype(args, "jaxkv info")
    _check_storage(config, kind, dt, args.capacity, "jaxkv info")
    nbytes = cache_memory_bytes(config, args.batch_size, args.capacity, dt, kind)
    shapes = jax.eval_shape(lambda: KVCache.init(config, args.batch_size, args.capacity, dt, kind))
    print(
        f"KV cache for batch {args.batch_size} x capacity {args.capacity}: {nbytes:,} bytes "
        f"({nbytes / 2**20:.2f} MiB); layers: {shapes.describe()}"
    )
    per_kind: dict[str, int] = {}
    for layer in shapes.layers:
        name = type(layer).__name__
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layer))
        per_kind[name] = per_kind.get(name, 0) + size
    for name, size in per_kind.items():
        print(f"  {name}: {size:,} bytes ({size / 2**20:.2f} MiB)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxkv.checkpoint import CheckpointError
    from jaxkv.gguf_checkpoint import convert_gguf, is_gguf

    src = Path(args.src)
    if not src.is_file():
        raise UsageError(f"jaxkv convert: {src} does not exist")
    if not is_gguf(src):
        raise UsageError(f"jaxkv convert: {src} is not a GGUF file")
    try:
        out = convert_gguf(src, args.out, dtype=args.dtype)
    except (CheckpointError, ValueError) as e:
        raise UsageError(f"jaxkv convert: {e}") from None
    print(f"wrote {out} (model.safetensors, config.json, tokenizer.json, tokenizer_config.json)")
    return 0


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _chat_model(path: str | None) -> str:
    from jaxkv.paths import FETCH_COMMAND, smollm2_path

    if path:
        return path
    real = smollm2_path()
    if not real.is_file():
        raise UsageError(
            f"jaxkv chat: no --model given and the real model is not at {real}; fetch it with "
            f"`{FETCH_COMMAND}` or pass --model DIR_OR_GGUF"
        )
    return str(real)


def _user_turns() -> Any:
    """User turns: typed at a prompt on a terminal, else one per line of stdin."""
    if sys.stdin.isatty():
        while True:
            try:
                line = input("> ")
            except EOFError:
                return
            if line.strip():
                yield line
    else:
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line.strip():
                yield line


def cmd_chat(args: argparse.Namespace) -> int:
    from jaxkv.chat import Conversation
    from jaxkv.sampling import SamplingConfig

    try:
        sampling = SamplingConfig(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
        )
    except ValueError as e:
        raise UsageError(f"jaxkv chat: {e}") from None
    config, params, tokenizer, _ = _load(_chat_model(args.model), args.dtype)
    try:
        chat = Conversation(
            params,
            config,
            tokenizer,
            capacity=args.capacity,
            sampling=sampling,
            key=args.seed,
            chat_template_kwargs=args.template_kwargs,
        )
    except ValueError as e:
        raise UsageError(f"jaxkv chat: {e}") from None
    clock = _CompileClock()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    out = sys.stdout
    for turn, user in enumerate(_user_turns(), 1):
        messages.append({"role": "user", "content": user})
        start, compiled = time.perf_counter(), clock.seconds

        def show(text: str) -> None:
            out.write(text)
            out.flush()

        try:
            text, ids = chat.reply_text(messages, args.max_new_tokens, on_text=show)
        except ValueError as e:  # the conversation outgrew the cache
            raise UsageError(f"jaxkv chat: {e}") from None
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": text})
        elapsed = time.perf_counter() - start
        run = max(elapsed - (clock.seconds - compiled), 1e-9)
        if chat.stop_reason != "end_of_turn":
            print(f"[jaxkv] the reply stopped at {chat.stop_reason}", file=sys.stderr)
        print(
            f"[jaxkv] turn {turn}: prefilled {chat.prefilled[-1]} new tokens "
            f"(cache holds {len(chat.tokens)}), {len(ids)} tokens in {elapsed:.2f}s, "
            f"{len(ids) / run:.1f} tokens/s excluding {clock.seconds - compiled:.2f}s of "
            "compilation",
            file=sys.stderr,
        )
    return 0


def _sampling_flags(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def _window_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-dtype",
        choices=["float32", "bfloat16", "int8", "int4"],
        default=None,
        help="storage of the cached keys and values (default: the model's dtype); int8/int4 "
        "keep a scale per token and head",
    )
    p.add_argument(
        "--kv-scales",
        choices=["head", "token", "kivi"],
        default="head",
        help="with --kv-dtype int8/int4: a scale per token and KV head, per token, or KIVI "
        "(keys per channel in groups of --kv-group tokens, values per token and head)",
    )
    p.add_argument(
        "--kv-group",
        type=_positive_int,
        default=32,
        help="tokens per KIVI key-scale group and per residual group (default 32)",
    )
    p.add_argument(
        "--kv-residual",
        action="store_true",
        help="read the newest group of tokens in full precision (KIVI's residual)",
    )
    p.add_argument(
        "--window",
        type=_positive_int,
        default=None,
        help="bound the cache of every layer to a ring of the last WINDOW tokens",
    )
    p.add_argument(
        "--sinks", type=int, default=0, help="with --window: keep each row's first SINKS tokens"
    )
    p.add_argument(
        "--h2o",
        metavar="HEAVY,RECENT",
        default=None,
        help="bound every layer's cache to HEAVY heavy-hitter + RECENT newest tokens (H2O)",
    )
    p.add_argument(
        "--snapkv",
        metavar="BUDGET[,WINDOW]",
        default=None,
        help="compress prompts longer than BUDGET tokens per layer with SnapKV (the last "
        "WINDOW queries, default 32, vote on what to keep)",
    )
    p.add_argument(
        "--snapkv-decode",
        choices=["h2o", "ring"],
        default="h2o",
        help="with --snapkv: how generation continues in the budget",
    )
    p.add_argument(
        "--sink-positions",
        choices=["cache", "original"],
        default="cache",
        help="score the sinks at positions within the cache (StreamingLLM) or the original ones",
    )


def _cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not keep compiled programs on disk (also JAXKV_NO_COMPILE_CACHE=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxkv", description="Fast decoding with an explicit KV cache.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text, streamed as it is made")
    gen.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    gen.add_argument("--model", help="a model directory or GGUF file (default: the bundled model)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=200)
    _sampling_flags(gen, 0.8, 0.95)
    gen.add_argument("--num-samples", type=_positive_int, default=1)
    gen.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=8,
        help="decode steps per compiled chunk between screen updates",
    )
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    _window_flags(gen)
    _cache_flag(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat", help="chat with a model's template; the cache is kept between turns"
    )
    chat.add_argument(
        "--model",
        help="a model directory or GGUF file with a chat template (default: the real model "
        "fetched by scripts/fetch_real_model.sh)",
    )
    chat.add_argument("--system", help="a system message")
    chat.add_argument(
        "--template-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="variables for the chat template, e.g. '{\"enable_thinking\": false}' (Qwen3)",
    )
    chat.add_argument("--max-new-tokens", type=_positive_int, default=256)
    chat.add_argument("--capacity", type=_positive_int, default=4096, help="cache slots")
    _sampling_flags(chat, 0.2, 0.9)
    chat.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    _cache_flag(chat)
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser("convert", help="write a GGUF file as a Hugging Face directory")
    conv.add_argument("src", help="the .gguf file")
    conv.add_argument("out", help="the directory to write")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="config, parameter count and KV-cache memory")
    info.add_argument("--model", help="a model directory (default: the bundled model)")
    info.add_argument("--batch-size", type=_positive_int, default=1)
    info.add_argument("--capacity", type=_positive_int, default=2048)
    info.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    _window_flags(info)
    _cache_flag(info)
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
        if hasattr(args, "no_compile_cache"):
            enable_compile_cache(not args.no_compile_cache)
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
