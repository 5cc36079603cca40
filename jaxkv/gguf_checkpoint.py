"""GGUF checkpoints (llama.cpp's format): weights, config and tokenizer from one `.gguf` file.

The file is read with the `gguf` package (llama.cpp's own reader, memory-mapped); quantized
tensors are dequantized with its reference NumPy code. Everything is mapped onto the Hugging
Face names and config keys that `jaxkv.checkpoint` already understands, so a GGUF model goes
through the same shape checks and param layout as a safetensors directory:

- tensor names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, ...;
- llama.cpp stores the q and k projections of `llama` models with the rows of each head
  permuted (interleaved rotary pairs); that permutation is undone here;
- metadata `{arch}.block_count`, `{arch}.embedding_length`, ... -> config.json keys;
- `tokenizer.ggml.*` -> a `tokenizers` byte-level BPE tokenizer (vocabulary, merges, the
  pre-tokenizer the file names, control tokens as special tokens) plus its chat template.

`convert_gguf(src, out_dir)` writes the model as a Hugging Face directory (safetensors,
config.json, tokenizer.json, tokenizer_config.json with the chat template).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxkv.checkpoint import CheckpointError

# llama.cpp architecture -> Hugging Face model_type. Both are plain Llama blocks here; llama.cpp
# permutes q/k rows only for `llama` (its converter for Qwen2 keeps the HF order).
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_PERMUTED_QK = ("llama",)
# Stored types that gguf's reference code dequantizes (the K-quants, the legacy block types and
# plain floats).
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
SUPPORTED_TOKENIZERS = ("gpt2",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Pre-tokenizer split expressions by `tokenizer.ggml.pre` (llama.cpp's names). None: GPT-2's
# own byte-level regex. "digits": each digit alone, then GPT-2's regex (SmolLM).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "smollm": "digits",
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class GGUFTokenizerSpec:
    """What a GGUF says about its tokenizer: a `tokenizers.Tokenizer`, the special token ids and
    the chat template (None if the file has none)."""

    tokenizer: Any
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None
    add_bos: bool
    stop_ids: list[int]

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tokenizer.id_to_token(i)


def _reader(path: Path) -> tuple[Any, dict[str, Any]]:
    """(reader, metadata) of a GGUF file, parsed once per process for each version of the file:
    gguf's reader parses every vocabulary entry in Python (seconds for a 49k vocabulary), and
    loading a model and its tokenizer both need it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    st = path.stat()
    return _parse(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _parse(path: str, mtime_ns: int, size: int) -> tuple[Any, dict[str, Any]]:
    reader = _open(Path(path))
    return reader, _fields(reader)


def _open(path: Path) -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a core dependency
        raise CheckpointError("reading GGUF files needs the `gguf` package") from e
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, ...
        raise CheckpointError(f"cannot read {path} as GGUF: {e}") from e


def _fields(reader: Any) -> dict[str, Any]:
    """Metadata as plain Python values (arrays as lists)."""
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception as e:
            raise CheckpointError(f"cannot read GGUF metadata {name!r}: {e}") from e
    return out


def _architecture(meta: dict[str, Any], path: Any) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def hf_config_from_gguf(meta: dict[str, Any], tensor_names: set[str], path: Any = "") -> dict:
    """A Hugging Face config.json dict from GGUF metadata (and which tensors exist)."""
    arch = _architecture(meta, path)

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise CheckpointError(f"{path}: GGUF metadata {full!r} is missing")
        return default

    heads = int(get("attention.head_count"))
    d = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", d // heads, required=False))
    rope_dims = int(get("rope.dimension_count", head_dim, required=False))
    if rope_dims != head_dim:
        raise CheckpointError(
            f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rope_dims} of "
            f"head_dim {head_dim}) are not supported"
        )
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(
            f"{path}: per-frequency RoPE factors (the rope_freqs tensor, Llama 3.1 scaling) are "
            "not supported"
        )
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise CheckpointError(f"{path}: GGUF has neither {arch}.vocab_size nor a vocabulary")
    hf: dict[str, Any] = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": d,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads, required=False)),
        "head_dim": head_dim,
        "intermediate_size": int(get("feed_forward_length")),
        "max_position_embeddings": int(get("context_length", 2048, required=False)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0, required=False)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported (only linear)")
    window = get("attention.sliding_window", None, required=False)
    if window:
        raise CheckpointError(f"{path}: a sliding window ({window}) in a GGUF is not supported")
    if arch == "llama":
        bias = "blk.0.attn_q.bias" in tensor_names
        hf.update(attention_bias=bias, mlp_bias=False)
    for key, name in (
        ("bos_token_id", "bos"),
        ("eos_token_id", "eos"),
        ("pad_token_id", "padding"),
    ):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            hf[key] = int(value)
    return hf


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it stores the rotary pairs interleaved
    (rows 0, half, 1, half + 1, ...); Hugging Face keeps the two halves apart."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFWeights:
    """Tensors of a GGUF file under their Hugging Face names, dequantized to float32 on read."""

    def __init__(self, reader: Any, hf: dict[str, Any], arch: str, path: Any) -> None:
        self.path = path
        self.hf = hf
        self.arch = arch
        self.tensors = {}
        self.unknown = []
        for t in reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                self.unknown.append(t.name)
            else:
                self.tensors[name] = t
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        import gguf

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor for {name!r} is missing from the GGUF")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r} is stored as {kind}, which jaxkv cannot "
                f"dequantize; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        got = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dim first
        if got != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r} ({name}) has shape {got}, but the config "
                f"needs {tuple(shape)}"
            )
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if self.arch in _PERMUTED_QK:
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = _unpermute(w, self.hf["num_attention_heads"])
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = _unpermute(w, self.hf["num_key_value_heads"])
        self.used.add(name)
        return w

    def leftover(self) -> list[str]:
        return sorted(set(self.tensors) - self.used) + sorted(self.unknown)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_from_gguf(meta: dict[str, Any], path: Any = "") -> GGUFTokenizerSpec:
    """Build the tokenizer a GGUF's metadata describes (byte-level BPE)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise CheckpointError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_TOKENIZERS)}"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
            f"{', '.join(PRE_TOKENIZERS)}"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError(f"{path}: a byte-level GGUF tokenizer needs tokenizer.ggml.merges")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; a special token spelled otherwise (a llama.cpp
    # mislabel) is respelled so the vocabulary keeps every id.
    spelled = [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens
    ]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(spelled):
        if tok in vocab:
            raise CheckpointError(
                f"{path}: GGUF tokens {vocab[tok]} and {i} are both spelled {tokens[i]!r}"
            )
        vocab[tok] = i
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    # Control and user-defined tokens match whole in the text; those spelled outside the byte
    # alphabet (mislabels) stay ordinary vocabulary entries under their byte spelling.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _USER_DEFINED and set(t) <= alphabet
    ]
    tk.add_special_tokens(special)
    tk.add_tokens(user)

    def tid(name: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if v is None else int(v)

    bos, eos, pad = tid("bos"), tid("eos"), tid("padding")
    # Generation stops at EOS, and at the end-of-turn / end-of-message tokens files name apart.
    stops = sorted({i for i in (eos, tid("eot"), tid("eom")) if i is not None})
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_tok = tokens[bos]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos_tok} $A",
            pair=f"{bos_tok} $A {bos_tok} $B",
            special_tokens=[(bos_tok, bos)],
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return GGUFTokenizerSpec(
        tokenizer=tk,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos=add_bos,
        stop_ids=stops,
    )


@dataclass
class GGUFModel:
    """A GGUF file read: its HF-style config dict, weights and tokenizer."""

    hf_config: dict[str, Any]
    weights: GGUFWeights
    meta: dict[str, Any]
    path: Path

    def tokenizer(self) -> GGUFTokenizerSpec:
        return tokenizer_from_gguf(self.meta, self.path)


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Open a GGUF file: metadata, config and (lazily dequantized) weights."""
    path = Path(path)
    reader, meta = _reader(path)
    names = {t.name for t in reader.tensors}
    hf = hf_config_from_gguf(meta, names, path)
    weights = GGUFWeights(reader, hf, meta["general.architecture"], path)
    return GGUFModel(hf_config=hf, weights=weights, meta=meta, path=path)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """A file whose first four bytes are GGUF's magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def load_gguf(
    path: str | os.PathLike[str],
    dtype: Any = None,
    progress: bool = False,
) -> tuple[Any, Any]:
    """(config, params) from a GGUF file, dequantized to `dtype` (default float32)."""
    from jaxkv.checkpoint import params_from_reader

    model = read_gguf(path)
    return params_from_reader(model.hf_config, model.weights, dtype or "float32", progress, path)


def convert_gguf(
    src: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: Any = None
) -> Path:
    """Write a GGUF model as a Hugging Face directory: model.safetensors, config.json,
    generation_config.json, tokenizer.json and tokenizer_config.json (with the chat template).
    Returns the directory."""
    from jaxkv.checkpoint import params_from_reader, save_pretrained

    model = read_gguf(src)
    spec = model.tokenizer()
    config, params = params_from_reader(
        model.hf_config, model.weights, dtype or "float32", False, src
    )
    ids = {
        k: model.hf_config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if k in model.hf_config
    }
    out = save_pretrained(params, config, out_dir, extra_config=ids)
    spec.tokenizer.save(str(out / "tokenizer.json"))
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.add_bos,
        "bos_token": spec.token(spec.bos_id),
        "eos_token": spec.token(spec.eos_id),
        "pad_token": spec.token(spec.pad_id),
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if spec.chat_template:
        tok_config["chat_template"] = spec.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    gen = {k: v for k, v in ids.items() if k != "pad_token_id"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
