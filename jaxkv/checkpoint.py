"""Hugging Face checkpoints: config.json + *.safetensors in, and out (GGUF files in, through
`jaxkv.gguf_checkpoint`).

`load_pretrained(path)` reads a local directory (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`), maps config.json to a `ModelConfig` and the weights to jaxkv's
param tree through the family's table in `jaxkv.weight_map` (names, shapes and the transposes
and fusions where jaxkv's layout differs: q/k/v into one `qkv`, gate/up into one `wi`), and
checks every tensor's shape against the config. `save_pretrained` writes the same format
through the same table, so a jaxkv model opens in transformers and comes back unchanged.
Nothing here touches the network.

Supported `model_type`s: SUPPORTED_MODEL_TYPES (llama-like families as ModelConfig options of
the one model code, and gpt2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxkv import weight_map
from jaxkv.config import LAYER_TYPES, ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "ministral",
    "qwen2",
    "qwen3",
    "smollm3",
    "olmo2",
    "gemma2",
    "gemma3_text",
    "gemma3",  # multimodal: its text decoder (saved back as gemma3_text)
    "phi3",
    "gpt2",
)
_HF_GEMMA3_PATTERN = 6  # Gemma3TextConfig's sliding_window_pattern (legacy config.json)
_HF_GEMMA3_THETAS = (10000.0, 1_000_000.0)  # local, global
GEMMAS = ("gemma2", "gemma3_text")
_HF_GEMMA_HEAD_DIM = 256  # Gemma2Config's default head_dim
_HF_GEMMA2_SCALAR = 256  # Gemma2Config's query_pre_attn_scalar
_HF_DEFAULT_THETA = {"smollm3": 2_000_000.0}  # where config.json gives none (else 10000)
_HF_NO_ROPE_INTERVAL = 4  # SmolLM3Config
# Config classes' default special ids; where one lies outside a (small) vocabulary, saving
# writes None instead, since transformers refuses it (the tokenizer keeps the real ids).
_HF_SPECIAL_IDS = {
    "smollm3": {"pad_token_id": 128004, "bos_token_id": 128000, "eos_token_id": 128001},
    "olmo2": {"pad_token_id": 1, "eos_token_id": 50279},
}
_HF_QWEN3_HEAD_DIM = 128  # Qwen3Config's default head_dim (not hidden_size / heads)
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Buffers some checkpoints carry that hold no parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

Params = dict[str, Any]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as the config says."""


# --------------------------------------------------------------------------- configs


def _gemma3_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None, float]:
    """(global theta, global scaling, local theta) of a Gemma 3 config.json: per layer type
    in `rope_parameters` (transformers 5), or rope_theta / rope_scaling /
    rope_local_base_freq (earlier files)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(
                f"scaled RoPE on Gemma 3's sliding layers is not supported: {local}"
            )
        full = params.get("full_attention") or {}
        theta, scaling = _rope_from_hf({"rope_parameters": full})
        if "rope_theta" not in full:
            theta = _HF_GEMMA3_THETAS[1]
        return theta, scaling, float(local.get("rope_theta", _HF_GEMMA3_THETAS[0]))
    theta, scaling = _rope_from_hf(
        {**hf, "rope_theta": hf.get("rope_theta") or _HF_GEMMA3_THETAS[1]}
    )
    return theta, scaling, float(hf.get("rope_local_base_freq") or _HF_GEMMA3_THETAS[0])


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or {}
    default = _HF_DEFAULT_THETA.get(hf.get("model_type"), 10000.0)
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or default)
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type") else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
    raise CheckpointError(f"rope scaling type {kind!r} is not supported (only linear, llama3)")


# Hugging Face's defaults where config.json leaves a field out (transformers' config classes).
_HF_SLIDING_WINDOW = 4096  # MistralConfig, MinistralConfig, Qwen2Config
_HF_MAX_WINDOW_LAYERS = 28  # Qwen2Config
# transformers renames these legacy layer types when it reads a config (configuration_utils).
_HF_LEGACY_LAYER_TYPES = {"attention": "full_attention"}


def _hf_layer_types(hf: dict[str, Any]) -> list[str] | None:
    """config.json's `layer_types`, checked: only jaxkv's two attention types, one per layer."""
    raw = hf.get("layer_types")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise CheckpointError(f"layer_types must be a list of strings, got {raw!r}")
    types = [_HF_LEGACY_LAYER_TYPES.get(t, t) for t in raw]
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise CheckpointError(
            f"layer_types has {bad}, which jaxkv does not support (only {', '.join(LAYER_TYPES)})"
        )
    if len(types) != hf["num_hidden_layers"]:
        raise CheckpointError(
            f"layer_types has {len(types)} entries but num_hidden_layers={hf['num_hidden_layers']}"
        )
    return types


def _windows_from_hf(
    hf: dict[str, Any], model_type: str
) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) for a llama-like config.json, with the layers that slide
    exactly those transformers' model slides; layer_types is None when all layers are alike.

    transformers (5.x) decides per family:
    - llama: no layer slides (LlamaConfig has no window; a `layer_types` entry is ignored).
    - mistral: every layer slides by `sliding_window` (default 4096; null: none). With a
      `layer_types` list, AutoConfig reads the config as ministral instead (below).
    - ministral: the layers `layer_types` marks "sliding_attention" (default: every layer if
      `sliding_window` is set, else none).
    - qwen2: `sliding_window` only counts with `use_sliding_window` (else it is None); the
      layers `layer_types` marks, defaulting to layers i >= `max_window_layers` (default 28)
      when there is a window, else none.
    A sliding layer attends to `sliding_window` keys, itself included (mask
    key_pos > query_pos - sliding_window), as jaxkv does.
    """
    types = _hf_layer_types(hf)
    n = hf["num_hidden_layers"]
    if model_type in ("llama", "olmo2"):
        return None, None
    if model_type in GEMMAS:
        # Every other layer slides (Gemma 2), or all but every 6th (Gemma 3), unless
        # layer_types says.
        window = hf.get("sliding_window", _HF_SLIDING_WINDOW)
        every = (
            2 if model_type == "gemma2" else hf.get("sliding_window_pattern", _HF_GEMMA3_PATTERN)
        )
        if types is None:
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    elif model_type == "phi3":  # every layer slides when sliding_window is set (default none)
        window = hf.get("sliding_window")
        if types is None:
            types = ["sliding_attention" if window is not None else "full_attention"] * n
    elif model_type == "smollm3":
        # A window only with use_sliding_window; by default the NoPE layers slide.
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if types is None:
            rope = _smollm3_rope_layers(hf)
            types = [
                "sliding_attention" if window is not None and not r else "full_attention"
                for r in rope
            ]
    elif model_type in ("qwen2", "qwen3"):
        use = bool(hf.get("use_sliding_window", False))
        window = hf.get("sliding_window", _HF_SLIDING_WINDOW) if use else None
        if types is None:
            first = hf.get("max_window_layers", _HF_MAX_WINDOW_LAYERS)
            if window is not None and not isinstance(first, int):
                raise CheckpointError(f"max_window_layers must be an int, got {first!r}")
            types = [
                "sliding_attention" if window is not None and i >= first else "full_attention"
                for i in range(n)
            ]
    else:  # mistral, ministral
        window = hf.get("sliding_window", _HF_SLIDING_WINDOW)
        if types is None:
            types = ["sliding_attention" if window is not None else "full_attention"] * n
    if "sliding_attention" not in types:
        return None, None
    if window is None:
        why = " (use_sliding_window is false)" if model_type in ("qwen2", "qwen3") else ""
        raise CheckpointError(
            f"layer_types marks sliding_attention layers but {model_type} has no "
            f"sliding_window{why}; transformers cannot build their mask either"
        )
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise CheckpointError(f"sliding_window must be a positive int, got {window!r}")
    if "full_attention" not in types:
        return window, None
    return window, tuple(types)


def _smollm3_rope_layers(hf: dict[str, Any]) -> list[bool]:
    """SmolLM3's per-layer RoPE flags: `no_rope_layers` (1: the layer rotates, 0: NoPE),
    default every `no_rope_layer_interval`-th layer NoPE."""
    n = hf["num_hidden_layers"]
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = hf.get("no_rope_layer_interval", _HF_NO_ROPE_INTERVAL)
        return [(i + 1) % every != 0 for i in range(n)]
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) for f in flags):
        raise CheckpointError(f"no_rope_layers must be {n} entries of 0 or 1, got {flags!r}")
    return [bool(f) for f in flags]


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gemma3":
        return config_from_hf(_gemma3_text_config(hf), dtype)
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _TANH_GELUS:
            raise CheckpointError(f"gpt2 activation {act!r} is not supported ({_TANH_GELUS})")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise CheckpointError(
                "gpt2 attention scaling options other than 1/sqrt(d) are not supported"
            )
        d = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            ffn_dim=hf.get("n_inner") or 4 * d,
            max_seq_len=hf["n_positions"],
            norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            position="learned",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dtype=dtype,
        )
    gemma = model_type in GEMMAS
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if gemma and act not in _TANH_GELUS:
        raise CheckpointError(f"{model_type} activation {act!r} is not supported ({_TANH_GELUS})")
    if not gemma and act != "silu":
        raise CheckpointError(f"{model_type} hidden_act {act!r} is not supported (only silu)")
    theta, scaling = _rope_from_hf(hf)
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor")
    partial = hf.get("partial_rotary_factor", partial)
    if partial not in (None, 1, 1.0):
        raise CheckpointError(
            f"{model_type} partial_rotary_factor={partial} is not supported (rotary embeddings "
            "over the whole head only)"
        )
    # llama and qwen3 read attention_bias (q/k/v and o), llama mlp_bias; mistral and ministral
    # have no biases, qwen2 q/k/v biases always.
    attention_bias = model_type in ("llama", "qwen3", "smollm3", "olmo2", *GEMMAS) and bool(
        hf.get("attention_bias", False)
    )
    head_dim = hf.get("head_dim")
    if model_type == "qwen3" and head_dim is None:
        head_dim = _HF_QWEN3_HEAD_DIM
    if gemma and head_dim is None:
        head_dim = _HF_GEMMA_HEAD_DIM
    gemma_fields: dict[str, Any] = {}
    if gemma:
        caps = (50.0, 30.0) if model_type == "gemma2" else (None, None)
        gemma_fields = dict(
            mlp="geglu",
            norm_plus_one=True,
            embed_scale=True,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", _HF_GEMMA2_SCALAR)),
            attn_softcap=hf.get("attn_logit_softcapping", caps[0]),
            final_softcap=hf.get("final_logit_softcapping", caps[1]),
        )
    if model_type == "gemma3_text":
        if hf.get("use_bidirectional_attention"):
            raise CheckpointError("Gemma 3 with bidirectional attention is not a decoder")
        theta, scaling, local = _gemma3_rope(hf)
        gemma_fields["rope_local_theta"] = local
    sliding_window, layer_types = _windows_from_hf(hf, model_type)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=head_dim,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=attention_bias,
        mlp_bias=model_type in ("llama", "smollm3") and bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type in ("smollm3", *GEMMAS))),
        sliding_window=sliding_window,
        layer_types=layer_types,
        qk_norm={"qwen3": "head", "olmo2": "flat", "gemma3_text": "head"}.get(model_type),
        block_norms="post" if model_type == "olmo2" else "both" if gemma else "pre",
        **gemma_fields,
        rope_layers=tuple(_smollm3_rope_layers(hf)) if model_type == "smollm3" else None,
        dtype=dtype,
    )


def hf_model_type(config: ModelConfig) -> str:
    """The Hugging Face model_type that expresses `config`, or CheckpointError.

    Without a window: llama, or qwen2 for q/k/v biases alone. With one: mistral (no biases,
    every layer slides), ministral (no biases, some layers slide), qwen2 (q/k/v biases alone,
    any layers slide); no Hugging Face family has a window with output or MLP biases.
    """
    windows = {w for w in config.layer_windows if w is not None}
    if config.norm == "layer" or config.mlp == "gelu" or config.position == "learned":
        ok = (config.norm, config.mlp, config.position) == ("layer", "gelu", "learned") and (
            config.qkv_bias
            and config.out_bias
            and config.mlp_bias
            and config.n_kv_heads == config.n_heads
            and not windows
            and config.n_heads * config.head_dim == config.d_model
        )
        if not ok:
            raise CheckpointError(f"no Hugging Face model type expresses {config}")
        return "gpt2"
    gemma = (
        config.norm_plus_one
        or config.embed_scale
        or config.mlp == "geglu"
        or config.block_norms == "both"
        or config.query_pre_attn_scalar is not None
        or config.attn_softcap is not None
        or config.final_softcap is not None
    )
    if gemma:
        ok = (
            config.norm_plus_one
            and config.embed_scale
            and config.mlp == "geglu"
            and config.block_norms == "both"
            and config.qk_norm in (None, "head")
            and config.rope_layers is None
            and not config.mlp_bias
            and config.qkv_bias == config.out_bias
        )
        if not ok:
            raise CheckpointError(
                "gemma2 has (1 + w) RMSNorms around each sublayer, scaled embeddings, GeGLU, no "
                f"q/k norms and no MLP biases; no Hugging Face model type expresses {config}"
            )
        if config.qk_norm == "head" or config.rope_local_theta is not None:
            return "gemma3_text"
        return "gemma2"
    if config.block_norms == "post" or config.qk_norm == "flat":
        ok = (config.block_norms, config.qk_norm) == ("post", "flat") and not windows
        if not ok or config.mlp_bias or config.qkv_bias != config.out_bias:
            raise CheckpointError(
                "olmo2 has norms after each sublayer and q/k norms over the whole projection "
                "together, no window, q/k/v and output biases together or none, and no MLP "
                f"biases; no Hugging Face model type expresses {config}"
            )
        return "olmo2"
    if config.block_norms != "pre":
        raise CheckpointError(f"no supported Hugging Face model type expresses {config}")
    if config.rope_layers is not None:
        if config.qk_norm is not None or config.qkv_bias != config.out_bias:
            raise CheckpointError(
                "smollm3 (NoPE layers) has no q/k norms and q/k/v and output biases together "
                "(attention_bias) or none"
            )
        return "smollm3"
    if config.qk_norm == "head":
        if config.mlp_bias or config.qkv_bias != config.out_bias:
            raise CheckpointError(
                "qwen3 (q/k norms) has q/k/v and output biases together (attention_bias) or "
                "none, and no MLP biases"
            )
        return "qwen3"
    qwen2_biases = config.qkv_bias and not config.out_bias and not config.mlp_bias
    if windows:
        if qwen2_biases:
            return "qwen2"
        if config.qkv_bias or config.out_bias or config.mlp_bias:
            raise CheckpointError(
                "a sliding window with output or MLP biases has no Hugging Face model type "
                "(llama has the biases but no window; mistral and ministral have no biases; "
                "qwen2 has q/k/v biases only)"
            )
        return "mistral" if None not in config.layer_windows else "ministral"
    if qwen2_biases:
        return "qwen2"
    if config.qkv_bias != config.out_bias:
        raise CheckpointError("llama needs qkv_bias == out_bias (attention_bias)")
    return "llama"


def _number(x: float) -> int | float:
    """x as an int where it is one (config.json fields typed int in transformers)."""
    return int(x) if float(x).is_integer() else x


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json dict for `config`."""
    model_type = hf_model_type(config)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
    common = {
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": torch_dtype[config.dtype],
    }
    if model_type == "gpt2":
        return {
            **common,
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": config.d_model,
            "n_layer": config.n_layers,
            "n_head": config.n_heads,
            "n_inner": config.ffn_dim,
            "n_positions": config.max_seq_len,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": "gelu_new",
        }
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "ministral": "MinistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "smollm3": "SmolLM3ForCausalLM",
        "olmo2": "Olmo2ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM",
    }[model_type]
    out = {
        **common,
        "architectures": [arch],
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
    }
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        out["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor}
        if rs.kind == "llama3":
            out["rope_scaling"].update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position,
            )
    if model_type == "llama":
        out.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if model_type in ("qwen3", "olmo2"):
        out.update(attention_bias=config.qkv_bias)
    if model_type in GEMMAS:
        del out["hidden_act"]
        out.update(
            attention_bias=config.qkv_bias,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_number(config.query_pre_attn_scalar or config.head_dim),
            attn_logit_softcapping=config.attn_softcap,
            final_logit_softcapping=config.final_softcap,
        )
    if model_type == "gemma3_text":
        full = {"rope_type": "default", "rope_theta": config.rope_theta}
        if "rope_scaling" in out:
            full = {**out.pop("rope_scaling"), "rope_theta": config.rope_theta}
        local = config.rope_local_theta or config.rope_theta
        del out["rope_theta"]
        out["rope_parameters"] = {
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
            "full_attention": full,
        }
    for key, value in _HF_SPECIAL_IDS.get(model_type, {}).items():
        if value >= config.vocab_size:
            out[key] = None
    windows = config.layer_windows
    types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    window = next((w for w in windows if w is not None), None)
    if model_type == "smollm3":
        out.update(
            attention_bias=config.qkv_bias,
            mlp_bias=config.mlp_bias,
            no_rope_layers=[int(r) for r in config.rope_layers],
            use_sliding_window=window is not None,
            sliding_window=window,
            layer_types=types,
        )
    if model_type == "mistral":
        out["sliding_window"] = window
    if model_type in ("ministral", *GEMMAS):
        out.update(sliding_window=window, layer_types=types)
    if model_type in ("qwen2", "qwen3"):
        if window is None:
            out.update(use_sliding_window=False, sliding_window=None)
        else:
            # layer_types decides in transformers; max_window_layers (the full layers before
            # the first sliding one) says the same wherever the full layers all come first.
            out.update(
                use_sliding_window=True,
                sliding_window=window,
                max_window_layers=types.index("sliding_attention"),
                layer_types=types,
            )
    return out


# --------------------------------------------------------------------------- weights


class _Reader:
    """Reads named tensors from safetensors shards, checking shapes and tracking use."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files  # tensor name -> file
        self.used: set[str] = set()
        self._handles: dict[Path, Any] = {}

    def _open(self, path: Path) -> Any:
        from safetensors import safe_open

        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="np")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {path}: {e}") from e
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        handle = self._open(self.files[name])
        try:
            got = tuple(handle.get_slice(name).get_shape())
        except Exception as e:
            raise CheckpointError(
                f"cannot read tensor {name!r} from {self.files[name]}: {e}"
            ) from e
        if got != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {got}, but the config needs {tuple(shape)}"
            )
        try:
            arr = handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"cannot read tensor {name!r} from {self.files[name]}: {e}"
            ) from e
        self.used.add(name)
        return np.asarray(arr)

    def leftover(self) -> list[str]:
        return sorted(
            n for n in self.files if n not in self.used and not n.endswith(_IGNORED_SUFFIXES)
        )


def _gemma3_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's config.json of a multimodal Gemma 3 checkpoint (`text_config`)."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError("a gemma3 config.json needs a text_config (the text decoder's)")
    text = {**text, "model_type": "gemma3_text"}
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    return text


# Where a multimodal Gemma 3 checkpoint keeps its text decoder (as saved by transformers 4.5x
# and 5, and by 4.52+'s new layout), and the vision parts a text model leaves unread.
_GEMMA3_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_GEMMA3_VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


class _Gemma3TextDecoder:
    """A multimodal Gemma 3 checkpoint read as its text decoder, under gemma3_text's names."""

    def __init__(self, reader: Any, path: Any) -> None:
        self.reader = reader
        prefix = next(
            (p for p in _GEMMA3_TEXT_PREFIXES if reader.has(p + "embed_tokens.weight")), None
        )
        if prefix is None:
            raise CheckpointError(
                f"{path}: no text decoder weights in this gemma3 checkpoint (looked for "
                f"{[p + 'embed_tokens.weight' for p in _GEMMA3_TEXT_PREFIXES]})"
            )
        self.prefix = prefix
        self.head = (
            "language_model.lm_head.weight" if prefix.startswith("lang") else "lm_head.weight"
        )

    def _name(self, name: str) -> str:
        if name == "lm_head.weight":
            return self.head
        return self.prefix + name.removeprefix("model.")

    def has(self, name: str) -> bool:
        return self.reader.has(self._name(name))

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.reader.get(self._name(name), shape)

    def leftover(self) -> list[str]:
        left = self.reader.leftover()
        left = [n for n in left if not n.startswith(_GEMMA3_VISION_PREFIXES)]
        return ["lm_head.weight" if n == self.head else n for n in left]


class _Unprefixed:
    """GPT-2 checkpoints saved without the `transformer.` prefix, read under its names."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.reader.get(name.removeprefix("transformer."), shape)


def _layer_range(cfg: ModelConfig, progress: bool) -> Iterable[int]:
    if not progress:
        return range(cfg.n_layers)
    from tqdm import tqdm

    return tqdm(range(cfg.n_layers), desc="loading", unit="layer", leave=False)


# --------------------------------------------------------------------------- public


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in {index.name} but missing")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="np") as f:
            names = list(f.keys())
    except Exception as e:
        raise CheckpointError(f"cannot read {single}: {e}") from e
    return dict.fromkeys(names, single)


def _default_dtype(hf: dict[str, Any]) -> str:
    stored = hf.get("dtype") or hf.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def params_from_reader(
    hf: dict[str, Any], reader: Any, dtype: str, progress: bool, path: Any
) -> tuple[ModelConfig, Params]:
    """(config, params) from a config.json dict and a tensor reader (`get(name, shape)`,
    `has(name)`, `leftover()`), with every tensor checked and none left unused."""
    dtype = str(jnp.dtype(dtype))
    config = config_from_hf(hf, dtype=dtype)
    model_type = hf["model_type"]
    if model_type == "gemma3":  # multimodal: its text decoder, unread vision parts allowed
        reader, model_type = _Gemma3TextDecoder(reader, path), "gemma3_text"
    get = reader.get
    if model_type == "gpt2" and not reader.has("transformer.wte.weight"):
        get = _Unprefixed(reader).get
    table = weight_map.TABLES[model_type]
    params = weight_map.to_params(table, get, config, _layer_range(config, progress))
    leftover = reader.leftover()
    if config.tie_embeddings:  # some tied checkpoints also store the (identical) head
        leftover = [n for n in leftover if n != "lm_head.weight"]
    if leftover:
        raise CheckpointError(
            f"{len(leftover)} tensors in {path} have no place in a {hf['model_type']} model: "
            f"{leftover[:5]}"
        )
    params = _tree_map(lambda a: jnp.asarray(a, dtype=dtype), params)
    return config, params


def load_pretrained(
    path: str | os.PathLike[str], dtype: Any = None, progress: bool = False
) -> tuple[ModelConfig, Params]:
    """Load a Hugging Face checkpoint directory, or a GGUF file: returns (config, params).

    dtype: the params' and activations' dtype (default: the dtype config.json records, else
    float32; GGUF weights are dequantized to it, default float32). progress: show a progress
    bar over the layers. Raises CheckpointError (a ValueError) naming the file or tensor at
    fault.
    """
    path = Path(path)
    if path.is_file():
        from jaxkv.gguf_checkpoint import is_gguf, load_gguf

        if not is_gguf(path):
            raise CheckpointError(f"{path} is a file but not a GGUF file (no GGUF magic)")
        return load_gguf(path, dtype=dtype, progress=progress)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    hf = _read_json(path / "config.json")
    dtype = str(jnp.dtype(dtype)) if dtype is not None else _default_dtype(hf)
    return params_from_reader(hf, _Reader(_weight_files(path)), dtype, progress, path)


def _tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _iter_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> Iterator[dict]:
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shard and size + n > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensors[name]
        size += n
    if shard:
        yield shard


def save_pretrained(
    params: Params,
    config: ModelConfig,
    path: str | os.PathLike[str],
    *,
    extra_config: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write params and config as a Hugging Face checkpoint directory (config.json plus
    model.safetensors, or shards with an index beyond `max_shard_bytes`).

    Tensors are stored in the params' dtype. `extra_config` entries (e.g. eos_token_id) are
    added to config.json.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(config)
    hf.update(extra_config or {})
    host = _tree_map(np.asarray, params)
    tensors = weight_map.from_params(weight_map.TABLES[hf["model_type"]], host, config)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    shards = list(_iter_shards(tensors, max_shard_bytes))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
    else:
        files = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            files.update(dict.fromkeys(shard, fname))
        total = sum(v.nbytes for v in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": files}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    return path
