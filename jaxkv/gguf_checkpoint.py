"""GGUF checkpoints (llama.cpp's format): weights, config and tokenizer from one `.gguf` file.

The file is read with the `gguf` package (llama.cpp's own reader, memory-mapped); quantized
tensors are dequantized with its reference NumPy code. Everything is mapped onto the Hugging
Face names and config keys that `jaxkv.checkpoint` already understands, so a GGUF model goes
through the same shape checks and param layout as a safetensors directory:

- tensor names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, ...;
- llama.cpp stores the q and k projections of `llama` models with the rows of each head
  permuted (interleaved rotary pairs); that permutation is undone here;
- metadata `{arch}.block_count`, `{arch}.embedding_length`, ... -> config.json keys;
- `tokenizer.ggml.*` -> a `tokenizers` tokenizer (`jaxkv.gguf_tokenizer`).

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
from jaxkv.gguf_tokenizer import GGUFTokenizerSpec, tokenizer_from_gguf

# llama.cpp architecture -> Hugging Face model_type. All are Llama-like blocks here.
SUPPORTED_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
}
# llama.cpp runs these with consecutive-pair RoPE, so its converter permutes q/k rows.
_PERMUTED_QK = ("llama", "smollm3")
# SmolLM3 in llama.cpp: no RoPE on every 4th layer (fixed, no GGUF key), as transformers'
# default no_rope_layer_interval.
_SMOLLM3_NO_ROPE_EVERY = 4
# llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (every `*norm.weight`).
_NORM_PLUS_ONE = ("gemma2", "gemma3")
# Gemma in llama.cpp: sliding layers by a fixed pattern (every 2nd / 6th layer global), the
# local RoPE base of Gemma 3 fixed at 10000, and the query scale 1/sqrt(head_dim) except for
# the 27B models (recognised by their layer count), which use 1/sqrt(d_model / heads).
_GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_LOCAL_THETA = 10000.0
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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GEMMA_NORMS = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_ARCH_LAYER_NAMES = {
    # Phi-3 keeps its fused projections (jaxkv's phi3 table reads them, as for safetensors).
    "phi3": {
        "attn_qkv.weight": "self_attn.qkv_proj.weight",
        "ffn_up.weight": "mlp.gate_up_proj.weight",
    },
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
    # OLMo 2: norms after the sublayers only.
    "olmo2": {
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}


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
    if arch in _GEMMA_PATTERN:
        hf.update(_gemma_fields(arch, hf, window, get, path))
    elif window and arch == "phi3":  # every layer slides, as in transformers' Phi-3
        hf["sliding_window"] = int(window)
    elif window:
        raise CheckpointError(f"{path}: a sliding window ({window}) in a GGUF is not supported")
    if {"rope_factors_long.weight", "rope_factors_short.weight"} & tensor_names:
        raise CheckpointError(
            f"{path}: LongRoPE factors (rope_factors_long/short, Phi-3 128k) are not supported"
        )
    if arch == "llama":
        bias = "blk.0.attn_q.bias" in tensor_names
        hf.update(attention_bias=bias, mlp_bias=False)
    if arch == "qwen3":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    if arch == "smollm3":
        hf["no_rope_layer_interval"] = _SMOLLM3_NO_ROPE_EVERY
    for key, name in (
        ("bos_token_id", "bos"),
        ("eos_token_id", "eos"),
        ("pad_token_id", "padding"),
    ):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            hf[key] = int(value)
    return hf


def _gemma_fields(
    arch: str, hf: dict[str, Any], window: Any, get: Any, path: Any = ""
) -> dict[str, Any]:
    """Gemma 2/3 config.json fields from GGUF metadata, as llama.cpp runs these files."""
    layers, pattern = hf["num_hidden_layers"], _GEMMA_PATTERN[arch]
    if arch == "gemma2" and not window:  # llama.cpp requires it for gemma2
        raise CheckpointError(f"{path}: GGUF metadata 'gemma2.attention.sliding_window' is missing")
    pattern = get("attention.sliding_window_pattern", pattern, required=False)
    if isinstance(pattern, list):  # one flag per layer: sliding or not
        if len(pattern) != layers:
            raise CheckpointError(
                f"{path}: {arch}.attention.sliding_window_pattern has {len(pattern)} flags for "
                f"{layers} layers"
            )
        sliding = [bool(x) for x in pattern]
    else:
        sliding = [i % int(pattern) < int(pattern) - 1 for i in range(layers)]
    if not window:  # a Gemma 3 file may have no window: every layer global
        sliding = [False] * layers
    fields: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": (
            hf["hidden_size"] / hf["num_attention_heads"]
            if layers == _GEMMA_27B_LAYERS[arch]
            else hf["head_dim"]
        ),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }
    if window:
        fields["sliding_window"] = int(window)
    if arch == "gemma2":  # llama.cpp's defaults where the file has none
        fields["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0, False))
        fields["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0, False))
    else:
        final = get("final_logit_softcapping", 0.0, required=False)
        fields["final_logit_softcapping"] = float(final) if final else None
        fields["rope_local_base_freq"] = _GEMMA3_LOCAL_THETA
    return fields


def _hf_name(name: str, arch: str = "llama") -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer_names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
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
            name = _hf_name(t.name, arch)
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
        if self.arch in _NORM_PLUS_ONE and name.endswith("norm.weight"):
            w = w - 1.0
        if self.arch in _PERMUTED_QK:
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = _unpermute(w, self.hf["num_attention_heads"])
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = _unpermute(w, self.hf["num_key_value_heads"])
        self.used.add(name)
        return w

    def leftover(self) -> list[str]:
        return sorted(set(self.tensors) - self.used) + sorted(self.unknown)


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
