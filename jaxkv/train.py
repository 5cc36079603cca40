"""Train the bundled byte-level model on the Python standard library's own source files.

Every machine with Python has this corpus offline. Files are split by a stable hash of their
path relative to the stdlib: 1 in 20 is held out for evaluation. The held-out score is bits
per byte over non-overlapping windows of held-out text, next to a unigram byte model fitted
on the training files.

    python scripts/train_tiny.py --out jaxkv/assets/tiny-py     (or: jaxkv train --out ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import platform
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkv.checkpoint import save_pretrained
from jaxkv.config import ModelConfig
from jaxkv.model import Params, apply, init_params
from jaxkv.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
HOLDOUT_EVERY = 20
EXCLUDED_DIRS = ("test", "site-packages")

TINY_CONFIG = ModelConfig(
    vocab_size=TOKENIZER.vocab_size,
    d_model=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    ffn_dim=704,
    max_seq_len=2048,
    norm_eps=1e-5,
    rope_theta=10000.0,
)


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative name, path) of the stdlib's .py files, sorted, without the test suite."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] not in EXCLUDED_DIRS:
            out.append((rel, p))
    return out


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HOLDOUT_EVERY == 0


def encode_files(files: Sequence[Path]) -> np.ndarray:
    """One token stream: <bos> file bytes <eos>, file after file."""
    parts = []
    for p in files:
        data = np.frombuffer(p.read_bytes(), np.uint8).astype(np.int32)
        parts += [np.array([TOKENIZER.bos_id]), data, np.array([TOKENIZER.eos_id])]
    return np.concatenate(parts).astype(np.int32)


def corpus() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(train stream, held-out stream, held-out file names)."""
    files = stdlib_files()
    train = [p for rel, p in files if not is_heldout(rel)]
    held = [(rel, p) for rel, p in files if is_heldout(rel)]
    return encode_files(train), encode_files([p for _, p in held]), [r for r, _ in held]


def heldout_sample(n_bytes: int = 16384) -> bytes:
    """The first n_bytes of the held-out files, in order: the fixed text the bundled model's
    quality test scores (tests/fixtures/heldout_sample.txt holds a copy)."""
    held = [p for rel, p in stdlib_files() if is_heldout(rel)]
    return b"".join(p.read_bytes() for p in held)[:n_bytes]


def unigram_bits_per_byte(train: np.ndarray, held: np.ndarray) -> float:
    """Cross-entropy (bits) of held-out bytes under byte frequencies of the training stream
    (add-one smoothing)."""
    counts = np.bincount(train[train < 256], minlength=256).astype(np.float64) + 1
    logp = np.log2(counts / counts.sum())
    held_bytes = held[held < 256]
    return float(-logp[held_bytes].mean())


def _loss(params: Params, config: ModelConfig, tokens: jax.Array) -> tuple[jax.Array, Any]:
    """Mean next-token cross-entropy (nats) over targets, and (sum nats, n) over byte targets."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    logits, _ = apply(params, config, inputs, positions)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    is_byte = targets < 256
    return nll.mean(), (jnp.sum(jnp.where(is_byte, nll, 0.0)), jnp.sum(is_byte))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1300
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 256


def evaluate(
    params: Params,
    config: ModelConfig,
    held: np.ndarray,
    seq_len: int,
    n_windows: int,
    batch_size: int = 32,
) -> float:
    """Bits per byte over the first n_windows non-overlapping windows of `held`."""
    n = min(n_windows, (len(held) - 1) // seq_len)
    windows = np.stack([held[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    step = jax.jit(lambda p, t: _loss(p, config, t)[1])
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        s, c = step(params, jnp.asarray(windows[i : i + batch_size]))
        total, count = total + float(s), count + int(c)
    return total / count / math.log(2)


def bits_per_byte_of_text(
    params: Params, config: ModelConfig, text: bytes, seq_len: int = 256
) -> float:
    """Bits per byte of one text scored as a document (<bos> text), in windows of seq_len."""
    stream = np.concatenate([[TOKENIZER.bos_id], np.frombuffer(text, np.uint8)]).astype(np.int32)
    n = (len(stream) - 1) // seq_len
    return evaluate(params, config, stream[: n * seq_len + 1], seq_len, n)


def train(
    config: ModelConfig, tc: TrainConfig, progress: bool = True
) -> tuple[Params, dict[str, Any]]:
    from tqdm import tqdm

    train_stream, held, held_names = corpus()
    key = jax.random.key(tc.seed)
    params = init_params(config, key, jnp.float32)
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, tc.steps, tc.lr * 0.05)
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b2=0.99, weight_decay=tc.weight_decay, mask=decay_mask),
    )
    opt_state = opt.init(params)

    @jax.jit
    def step(params: Params, opt_state: Any, batch: jax.Array) -> tuple[Params, Any, Any]:
        (loss, _), grads = jax.value_and_grad(lambda p: _loss(p, config, batch), has_aux=True)(
            params
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(tc.seed)
    span = tc.seq_len + 1
    start = time.perf_counter()
    bar = tqdm(range(tc.steps), disable=not progress, desc="train", unit="step")
    loss_ema = None
    for i in bar:
        offsets = rng.integers(0, len(train_stream) - span, size=tc.batch_size)
        batch = np.stack([train_stream[o : o + span] for o in offsets])
        params, opt_state, loss = step(params, opt_state, jnp.asarray(batch))
        if i % 20 == 0 or i == tc.steps - 1:
            loss = float(loss)
            loss_ema = loss if loss_ema is None else 0.8 * loss_ema + 0.2 * loss
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{loss_ema:.3f}",
                bpb=f"{loss_ema / math.log(2):.2f}",
                tok_s=f"{(i + 1) * tc.batch_size * tc.seq_len / elapsed:.0f}",
            )
    train_s = time.perf_counter() - start
    bpb = evaluate(params, config, held, tc.seq_len, tc.eval_windows)
    metrics = {
        "heldout_bits_per_byte": round(bpb, 4),
        "unigram_bits_per_byte": round(unigram_bits_per_byte(train_stream, held), 4),
        "eval": f"first {tc.eval_windows} non-overlapping {tc.seq_len}-token windows of the "
        f"{len(held_names)} held-out files ({len(held)} tokens)",
        "heldout_files": held_names,
        "train_tokens_seen": tc.steps * tc.batch_size * tc.seq_len,
        "train_stream_tokens": len(train_stream),
        "train_seconds": round(train_s, 1),
        "train_config": dataclasses.asdict(tc),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s)",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }
    return params, metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxkv train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="directory to write the model to")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
        )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    params, metrics = train(TINY_CONFIG, tc, progress=not args.no_progress)
    out = Path(args.out)
    save_pretrained(
        params,
        TINY_CONFIG,
        out,
        extra_config={
            "bos_token_id": TOKENIZER.bos_id,
            "eos_token_id": TOKENIZER.eos_id,
            "pad_token_id": TOKENIZER.pad_id,
        },
    )
    TOKENIZER.save(out)
    sample = heldout_sample()
    metrics["sample_bits_per_byte"] = round(bits_per_byte_of_text(params, TINY_CONFIG, sample), 4)
    metrics["sample"] = f"first {len(sample)} bytes of the held-out files (heldout_sample())"
    (out / "training.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k != "heldout_files"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
