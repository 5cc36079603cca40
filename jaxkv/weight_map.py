"""Checkpoint tensor names: one declarative table per family, used both to load and to save.

A table is a tuple of `Rule`s. A rule ties one jaxkv leaf (a dotted path in the params tree,
`{i}` standing for the layer) to the Hugging Face tensors it is made of (names with `{i}`),
their shapes (in the config's dimensions: `d` model width, `q` and `kv` the query and key/value
projection widths, `hd` head width, `f` MLP width, `V` vocabulary, `P` positions), and a
`Transform` that runs both ways: `load(cfg, *theirs) -> ours`, `save(cfg, ours) -> theirs`.
A rule can apply to some configs only (`when`: biases, untied heads).

`to_params(table, get, cfg)` builds the params tree from a tensor getter (which checks each
shape), `from_params(table, params, cfg)` gives back the named tensors. A new llama-like family
is a table made of the blocks below plus its config fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from jaxkv.config import ModelConfig

Params = dict[str, Any]
Getter = Callable[[str, tuple[int, ...]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """`load(cfg, *theirs) -> ours` and its inverse `save(cfg, ours) -> theirs` (a tuple)."""

    load: Callable[..., np.ndarray]
    save: Callable[..., tuple[np.ndarray, ...]]


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str  # dotted params path, "{i}" for the layer
    theirs: tuple[str, ...]  # checkpoint names, "{i}" for the layer
    shapes: tuple[str, ...]  # one per name: space-separated dimensions ("q d")
    transform: Transform
    when: Callable[[ModelConfig], bool] | None = None

    def applies(self, cfg: ModelConfig) -> bool:
        return self.when is None or bool(self.when(cfg))


def _dims(cfg: ModelConfig) -> dict[str, int]:
    d, f, hd = cfg.d_model, cfg.ffn_dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return {
        "d": d,
        "hd": hd,
        "q": q,
        "kv": kv,
        "f": f,
        "V": cfg.vocab_size,
        "P": cfg.max_seq_len,
        "3d": 3 * d,
        "qkv": q + 2 * kv,
        "2f": 2 * f,
    }


def shape_of(spec: str, cfg: ModelConfig) -> tuple[int, ...]:
    """A rule's shape string in `cfg`'s numbers: "q d" -> (n_heads * head_dim, d_model)."""
    dims = _dims(cfg)
    return tuple(dims[s] for s in spec.split())


# --------------------------------------------------------------------------- transforms


def _same_load(cfg: ModelConfig, x: np.ndarray) -> np.ndarray:
    return x


SAME = Transform(_same_load, lambda cfg, x: (x,))
TRANSPOSE = Transform(lambda cfg, x: x.T, lambda cfg, x: (x.T,))


def _heads(cfg: ModelConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[out, d] q/k/v projections -> jaxkv's [d, kv heads, q per kv + 2, head_dim]."""
    d, kv, g, hd = cfg.d_model, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim
    parts = [q.T.reshape(d, kv, g, hd), k.T.reshape(d, kv, 1, hd), v.T.reshape(d, kv, 1, hd)]
    return np.concatenate(parts, axis=2)


def _unheads(cfg: ModelConfig, x: np.ndarray) -> tuple[np.ndarray, ...]:
    d, g = cfg.d_model, cfg.q_per_kv
    return tuple(part.reshape(d, -1).T for part in (x[:, :, :g], x[:, :, g], x[:, :, g + 1]))


QKV = Transform(_heads, _unheads)


def _fused_qkv_load(cfg: ModelConfig, w: np.ndarray) -> np.ndarray:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return _heads(cfg, w[:q], w[q : q + kv], w[q + kv :])


# Phi-3's qkv_proj: rows [q | k | v].
FUSED_QKV = Transform(_fused_qkv_load, lambda cfg, x: (np.concatenate(_unheads(cfg, x), axis=0),))


def _bias_load(cfg: ModelConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    kv, g, hd = cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim
    return np.concatenate([q.reshape(kv, g, hd), k.reshape(kv, 1, hd), v.reshape(kv, 1, hd)], 1)


def _bias_save(cfg: ModelConfig, b: np.ndarray) -> tuple[np.ndarray, ...]:
    g = cfg.q_per_kv
    return b[:, :g].reshape(-1), b[:, g].reshape(-1), b[:, g + 1].reshape(-1)


QKV_BIAS = Transform(_bias_load, _bias_save)
OUT = Transform(
    lambda cfg, w: w.T.reshape(cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.d_model),
    lambda cfg, x: (x.reshape(-1, cfg.d_model).T,),
)
GATE_UP = Transform(
    lambda cfg, gate, up: np.stack([gate.T, up.T], 1), lambda cfg, x: (x[:, 0].T, x[:, 1].T)
)
# Phi-3's gate_up_proj: rows [gate | up].
FUSED_GATE_UP = Transform(
    lambda cfg, w: np.stack([w[: cfg.ffn_dim].T, w[cfg.ffn_dim :].T], 1),
    lambda cfg, x: (np.concatenate([x[:, 0].T, x[:, 1].T], 0),),
)
GATE_UP_BIAS = Transform(lambda cfg, gate, up: np.stack([gate, up]), lambda cfg, x: (x[0], x[1]))
# GPT-2's Conv1D weights are [in, out]; c_attn's columns are [q | k | v], each heads-major.
GPT2_QKV = Transform(
    lambda cfg, w: w.reshape(cfg.d_model, 3, cfg.n_heads, cfg.head_dim).transpose(0, 2, 1, 3),
    lambda cfg, x: (x.transpose(0, 2, 1, 3).reshape(cfg.d_model, -1),),
)
GPT2_QKV_BIAS = Transform(
    lambda cfg, b: b.reshape(3, cfg.n_heads, cfg.head_dim).transpose(1, 0, 2),
    lambda cfg, x: (x.transpose(1, 0, 2).reshape(-1),),
)
GPT2_OUT = Transform(
    lambda cfg, w: w.reshape(cfg.n_heads, 1, cfg.head_dim, cfg.d_model),
    lambda cfg, x: (x.reshape(cfg.d_model, cfg.d_model),),
)
ADD_AXIS = Transform(lambda cfg, x: x[None], lambda cfg, x: (x[0],))
ADD_AXIS_1 = Transform(lambda cfg, x: x[:, None], lambda cfg, x: (x[:, 0],))


# --------------------------------------------------------------------------- tables


def _untied(cfg: ModelConfig) -> bool:
    return not cfg.tie_embeddings


L = "model.layers.{i}."
EMBEDDINGS = (
    Rule("embed", ("model.embed_tokens.weight",), ("V d",), SAME),
    Rule("final_norm.scale", ("model.norm.weight",), ("d",), SAME),
    Rule("lm_head", ("lm_head.weight",), ("V d",), TRANSPOSE, _untied),
)
ATTENTION = (
    Rule(
        "layers_{i}.attn.qkv",
        (
            L + "self_attn.q_proj.weight",
            L + "self_attn.k_proj.weight",
            L + "self_attn.v_proj.weight",
        ),
        ("q d", "kv d", "kv d"),
        QKV,
    ),
    Rule("layers_{i}.attn.o", (L + "self_attn.o_proj.weight",), ("d q",), OUT),
)
ATTENTION_BIASES = (
    Rule(
        "layers_{i}.attn.qkv_bias",
        (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
        ("q", "kv", "kv"),
        QKV_BIAS,
        lambda cfg: cfg.qkv_bias,
    ),
    Rule(
        "layers_{i}.attn.o_bias", (L + "self_attn.o_proj.bias",), ("d",), SAME, lambda c: c.out_bias
    ),
)
MLP = (
    Rule(
        "layers_{i}.mlp.wi",
        (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
        ("f d", "f d"),
        GATE_UP,
    ),
    Rule("layers_{i}.mlp.wo", (L + "mlp.down_proj.weight",), ("d f",), TRANSPOSE),
)
MLP_BIASES = (
    Rule(
        "layers_{i}.mlp.bi",
        (L + "mlp.gate_proj.bias", L + "mlp.up_proj.bias"),
        ("f", "f"),
        GATE_UP_BIAS,
        lambda cfg: cfg.mlp_bias,
    ),
    Rule("layers_{i}.mlp.bo", (L + "mlp.down_proj.bias",), ("d",), SAME, lambda c: c.mlp_bias),
)


def _norms(pairs: Iterable[tuple[str, str]]) -> tuple[Rule, ...]:
    return tuple(
        Rule(f"layers_{{i}}.{ours}.scale", (L + theirs,), ("d",), SAME) for ours, theirs in pairs
    )


# Llama: post_attention_layernorm is the MLP's input norm.
PRE_NORMS = _norms(
    [("attn_norm", "input_layernorm.weight"), ("mlp_norm", "post_attention_layernorm.weight")]
)
# OLMo 2: norms after each sublayer only.
POST_NORMS = _norms(
    [
        ("attn_post_norm", "post_attention_layernorm.weight"),
        ("mlp_post_norm", "post_feedforward_layernorm.weight"),
    ]
)
# Gemma 2/3: both.
BOTH_NORMS = _norms(
    [
        ("attn_norm", "input_layernorm.weight"),
        ("attn_post_norm", "post_attention_layernorm.weight"),
        ("mlp_norm", "pre_feedforward_layernorm.weight"),
        ("mlp_post_norm", "post_feedforward_layernorm.weight"),
    ]
)
HEAD_QK_NORMS = (  # Qwen3, Gemma 3: over head_dim
    Rule("layers_{i}.attn.q_norm", (L + "self_attn.q_norm.weight",), ("hd",), SAME),
    Rule("layers_{i}.attn.k_norm", (L + "self_attn.k_norm.weight",), ("hd",), SAME),
)
FLAT_QK_NORMS = (  # OLMo 2: over the whole projection
    Rule("layers_{i}.attn.q_norm", (L + "self_attn.q_norm.weight",), ("q",), SAME),
    Rule("layers_{i}.attn.k_norm", (L + "self_attn.k_norm.weight",), ("kv",), SAME),
)
_LLAMA_BODY = EMBEDDINGS + ATTENTION + ATTENTION_BIASES + MLP + MLP_BIASES

LLAMA = _LLAMA_BODY + PRE_NORMS
QWEN3 = LLAMA + HEAD_QK_NORMS
OLMO2 = _LLAMA_BODY + POST_NORMS + FLAT_QK_NORMS
GEMMA2 = _LLAMA_BODY + BOTH_NORMS
GEMMA3 = GEMMA2 + HEAD_QK_NORMS
PHI3 = (
    EMBEDDINGS
    + PRE_NORMS
    + (
        Rule("layers_{i}.attn.qkv", (L + "self_attn.qkv_proj.weight",), ("qkv d",), FUSED_QKV),
        Rule("layers_{i}.attn.o", (L + "self_attn.o_proj.weight",), ("d q",), OUT),
        Rule("layers_{i}.mlp.wi", (L + "mlp.gate_up_proj.weight",), ("2f d",), FUSED_GATE_UP),
        Rule("layers_{i}.mlp.wo", (L + "mlp.down_proj.weight",), ("d f",), TRANSPOSE),
    )
)

H = "transformer.h.{i}."


def _layer_norm(ours: str, theirs: str) -> tuple[Rule, ...]:
    return (
        Rule(f"{ours}.scale", (f"{theirs}.weight",), ("d",), SAME),
        Rule(f"{ours}.bias", (f"{theirs}.bias",), ("d",), SAME),
    )


GPT2 = (
    Rule("embed", ("transformer.wte.weight",), ("V d",), SAME),
    Rule("pos_embed", ("transformer.wpe.weight",), ("P d",), SAME),
    *_layer_norm("final_norm", "transformer.ln_f"),
    *_layer_norm("layers_{i}.attn_norm", H + "ln_1"),
    *_layer_norm("layers_{i}.mlp_norm", H + "ln_2"),
    Rule("layers_{i}.attn.qkv", (H + "attn.c_attn.weight",), ("d 3d",), GPT2_QKV),
    Rule("layers_{i}.attn.qkv_bias", (H + "attn.c_attn.bias",), ("3d",), GPT2_QKV_BIAS),
    Rule("layers_{i}.attn.o", (H + "attn.c_proj.weight",), ("d d",), GPT2_OUT),
    Rule("layers_{i}.attn.o_bias", (H + "attn.c_proj.bias",), ("d",), SAME),
    Rule("layers_{i}.mlp.wi", (H + "mlp.c_fc.weight",), ("d f",), ADD_AXIS_1),
    Rule("layers_{i}.mlp.bi", (H + "mlp.c_fc.bias",), ("f",), ADD_AXIS),
    Rule("layers_{i}.mlp.wo", (H + "mlp.c_proj.weight",), ("f d",), SAME),
    Rule("layers_{i}.mlp.bo", (H + "mlp.c_proj.bias",), ("d",), SAME),
    Rule("lm_head", ("lm_head.weight",), ("V d",), TRANSPOSE, _untied),
)

# Hugging Face model_type -> table.
TABLES: dict[str, tuple[Rule, ...]] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "ministral": LLAMA,
    "qwen2": LLAMA,
    "smollm3": LLAMA,
    "qwen3": QWEN3,
    "olmo2": OLMO2,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
    "phi3": PHI3,
    "gpt2": GPT2,
}


# --------------------------------------------------------------------------- engine


def _expand(rule: Rule, layers: Iterable[int]) -> Iterable[tuple[str, tuple[str, ...]]]:
    if "{i}" not in rule.ours:
        yield rule.ours, rule.theirs
        return
    for i in layers:
        yield rule.ours.format(i=i), tuple(n.format(i=i) for n in rule.theirs)


def _put(tree: Params, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    if leaf in tree:
        raise ValueError(f"two rules write the params leaf {path!r}")
    tree[leaf] = value


def _take(tree: Params, path: str) -> Any:
    for p in path.split("."):
        tree = tree[p]
    return tree


def to_params(
    table: Iterable[Rule], get: Getter, cfg: ModelConfig, layers: Iterable[int] | None = None
) -> Params:
    """The params tree a table builds from `get(name, shape)` (layer by layer, so `layers`
    can be a progress bar over range(n_layers))."""
    rules = [r for r in table if r.applies(cfg)]
    params: Params = {}
    for rule in (r for r in rules if "{i}" not in r.ours):
        _load(rule, rule.ours, rule.theirs, get, cfg, params)
    for i in range(cfg.n_layers) if layers is None else layers:
        for rule in (r for r in rules if "{i}" in r.ours):
            theirs = tuple(n.format(i=i) for n in rule.theirs)
            _load(rule, rule.ours.format(i=i), theirs, get, cfg, params)
    return params


def _load(
    rule: Rule, ours: str, theirs: tuple[str, ...], get: Getter, cfg: ModelConfig, out: Params
) -> None:
    arrays = [get(n, shape_of(s, cfg)) for n, s in zip(theirs, rule.shapes, strict=True)]
    _put(out, ours, rule.transform.load(cfg, *arrays))


def from_params(table: Iterable[Rule], params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The named checkpoint tensors a table makes of `params` (the inverse of to_params)."""
    out: dict[str, np.ndarray] = {}
    for rule in table:
        if not rule.applies(cfg):
            continue
        for ours, theirs in _expand(rule, range(cfg.n_layers)):
            arrays = rule.transform.save(cfg, np.asarray(_take(params, ours)))
            for name, spec, array in zip(theirs, rule.shapes, arrays, strict=True):
                if array.shape != shape_of(spec, cfg):
                    raise ValueError(
                        f"{ours} gives {name} of shape {array.shape}, expected "
                        f"{shape_of(spec, cfg)}"
                    )
                out[name] = array
    return out
