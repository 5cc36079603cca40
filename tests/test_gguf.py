"""GGUF checkpoints on small files written here with gguf's own writer: names, q/k permutation
and config against a transformers model, every dequantized type against an independent bound or
hand-packed blocks, the tokenizer against transformers' GGUF tokenizer, conversion and errors.
The real SmolLM2 GGUF is tested in tests/test_real_model.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxkv
from jaxkv.checkpoint import CheckpointError, load_pretrained
from jaxkv.gguf_checkpoint import read_gguf
from jaxkv.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch", reason="the oracle is transformers (test extra)")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
D, HEADS, KV, FFN, LAYERS = 256, 4, 2, 256, 2  # rows of 256: every matrix fits K-quant blocks
HD = D // HEADS
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_vocab():
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, then special tokens."""
    from jaxkv.gguf_tokenizer import _byte_alphabet

    symbols = list(_byte_alphabet().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
    tokens = [*symbols, "Ġt", "he", "Ġthe", "in", "Ġa", "er"]
    return tokens, merges


TOKENS, MERGES = _byte_vocab()
VOCAB = len(TOKENS) + len(SPECIAL)


def _permute(w, n_head):
    """llama.cpp's q/k row order (its converter's `permute`)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _names(i):
    return {
        f"model.layers.{i}.input_layernorm.weight": f"blk.{i}.attn_norm.weight",
        f"model.layers.{i}.post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
        f"model.layers.{i}.self_attn.q_proj.weight": f"blk.{i}.attn_q.weight",
        f"model.layers.{i}.self_attn.k_proj.weight": f"blk.{i}.attn_k.weight",
        f"model.layers.{i}.self_attn.v_proj.weight": f"blk.{i}.attn_v.weight",
        f"model.layers.{i}.self_attn.o_proj.weight": f"blk.{i}.attn_output.weight",
        f"model.layers.{i}.mlp.gate_proj.weight": f"blk.{i}.ffn_gate.weight",
        f"model.layers.{i}.mlp.up_proj.weight": f"blk.{i}.ffn_up.weight",
        f"model.layers.{i}.mlp.down_proj.weight": f"blk.{i}.ffn_down.weight",
    }


# llama.cpp's names for the norms of Gemma 2/3 and OLMo 2 layers (the rest as for llama).
_GEMMA_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_ARCH_NORMS = {
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
    "olmo2": {
        "post_attention_layernorm": "post_attention_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
}


def write_gguf(
    path,
    state,
    *,
    qtype=None,
    arch="llama",
    tokenizer_model="gpt2",
    raw=None,
    head_dim=HD,
    layers=LAYERS,
    theta=500.0,
    metadata=None,
    tied=False,
):
    """A GGUF of a transformers state dict, written as llama.cpp's converter writes `arch`.
    qtype: quantize every matrix with gguf's quantizer; raw: {gguf name: (bytes array, type)}
    stored as given; metadata(writer): more keys. q/k rows are permuted for `llama` only;
    Gemma's norm weights are stored as 1 + w and its tied head is left out."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    if head_dim != HD:  # as llama.cpp writes an explicit head size
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS + SPECIAL)
    w.add_token_types([1] * len(TOKENS) + [3] * len(SPECIAL))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(TOKENS) + 1)
    w.add_eos_token_id(len(TOKENS) + 2)
    w.add_pad_token_id(len(TOKENS))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    if metadata is not None:
        metadata(w)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(layers):
        names.update(_names(i))
        for theirs, ours in _ARCH_NORMS.get(arch, {}).items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"blk.{i}.{ours}.weight"
        names[f"model.layers.{i}.self_attn.q_norm.weight"] = f"blk.{i}.attn_q_norm.weight"
        names[f"model.layers.{i}.self_attn.k_norm.weight"] = f"blk.{i}.attn_k_norm.weight"
        names[f"model.layers.{i}.self_attn.qkv_proj.weight"] = f"blk.{i}.attn_qkv.weight"  # phi3
        names[f"model.layers.{i}.mlp.gate_up_proj.weight"] = f"blk.{i}.ffn_up.weight"
    raw = raw or {}
    for hf_name, g_name in names.items():
        if hf_name not in state:
            continue
        if (tied or arch in ("gemma2", "gemma3")) and hf_name == "lm_head.weight":
            continue  # a tied head: llama.cpp's converter writes none
        t = state[hf_name].float().numpy()
        if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            t = t + 1
        if g_name.endswith("attn_q.weight") and arch in ("llama", "smollm3"):
            t = _permute(t, HEADS)
        if g_name.endswith("attn_k.weight") and arch in ("llama", "smollm3"):
            t = _permute(t, KV)
        if g_name in raw:
            data, ty = raw[g_name]
            w.add_tensor(g_name, data, raw_dtype=ty)
        elif qtype is not None and t.ndim == 2:
            w.add_tensor(g_name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g_name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny(config_cls, model_cls, layers=LAYERS, **extra):
    """A tiny transformers model of the file dimensions, norms away from 1 (so a norm mapped to
    the wrong place shows)."""
    torch.manual_seed(0)
    extra = {"rope_theta": 500.0, "initializer_range": 0.2, **extra}
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        **extra,
    )
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_model():
    return _tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM)


@pytest.fixture(scope="module")
def f32_file(hf_model, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", hf_model.state_dict())


def test_f32_gguf_equals_transformers(hf_model, f32_file):
    config, params = load_pretrained(f32_file)
    assert (config.n_layers, config.n_kv_heads, config.rope_theta) == (LAYERS, KV, 500.0)
    seq = np.random.default_rng(0).integers(0, VOCAB, size=(2, 20))
    with torch.no_grad():
        ref = hf_model(torch.tensor(seq)).logits.numpy()
    got = np.asarray(jaxkv.forward(params, config, seq))
    np.testing.assert_allclose(got, ref, atol=1e-4)


def _equals_source_and_transformers(model, path, seed, transformers_reads_it=True):
    """jaxkv's logits of a GGUF equal the model it was written from and (where its GGUF reader
    supports the architecture) transformers loading the same GGUF; returns jaxkv's config."""
    config, params = load_pretrained(path)
    seq = np.random.default_rng(seed).integers(0, VOCAB, size=(2, 20))
    got = np.asarray(jaxkv.forward(params, config, seq))
    with torch.no_grad():
        ref = model(torch.tensor(seq)).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    if transformers_reads_it:
        with torch.no_grad():
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            ).eval()
            via_gguf = theirs(torch.tensor(seq)).logits.numpy()
        np.testing.assert_allclose(got, via_gguf, atol=1e-4)
    return config


def test_qwen3_gguf_equals_transformers_loading_it(tmp_path):
    """A Qwen3 GGUF (q/k norms, q/k rows in Hugging Face order, as llama.cpp's converter
    writes them). head_dim is Qwen3's 128: transformers' GGUF reader assumes its config
    default there."""
    model = _tiny(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=128)
    path = write_gguf(tmp_path / "q3.gguf", model.state_dict(), arch="qwen3", head_dim=128)
    config = _equals_source_and_transformers(model, path, seed=1)
    assert config.qk_norm == "head" and config.head_dim == 128


GEMMA_HD = 256  # transformers' GGUF reader assumes Gemma's query_pre_attn_scalar of 256
# Gemma scales embeddings by sqrt(d_model) = 16: smaller weights keep the logits near the
# other families' (|logit| < ~5), so 1e-4 stays a float32 rounding bound.
GEMMA_INIT = 0.1


def _gemma2(**caps):
    return _tiny(
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        initializer_range=GEMMA_INIT,
        head_dim=GEMMA_HD,
        query_pre_attn_scalar=GEMMA_HD,
        sliding_window=4,
        **caps,
    )


def _gemma2_file(model, path, caps=None):
    def metadata(w):
        w.add_sliding_window(4)
        if caps is not None:
            w.add_attn_logit_softcapping(caps[0])
            w.add_final_logit_softcapping(caps[1])

    return write_gguf(path, model.state_dict(), arch="gemma2", head_dim=GEMMA_HD, metadata=metadata)


def test_gemma2_gguf_equals_transformers_loading_it(tmp_path):
    """A Gemma 2 GGUF as llama.cpp writes it: norms stored as 1 + w, alternating sliding layers
    (window 4 of 20 tokens), soft-capping at llama.cpp's defaults (50, 30) when the file names
    none, query scale 1/sqrt(head_dim)."""
    model = _gemma2()
    path = _gemma2_file(model, tmp_path / "g2.gguf")
    config = _equals_source_and_transformers(model, path, seed=3)
    assert (config.attn_softcap, config.final_softcap) == (50.0, 30.0)
    assert config.layer_types == ("sliding_attention", "full_attention")
    assert config.norm_plus_one and config.sliding_window == 4


def test_gemma_gguf_bad_window_metadata_is_named(tmp_path):
    """A Gemma 2 file without its window, or a per-layer pattern of the wrong length, is an
    error naming the key, not a guess."""
    model = _gemma2()
    no_window = write_gguf(
        tmp_path / "nw.gguf", model.state_dict(), arch="gemma2", head_dim=GEMMA_HD
    )
    with pytest.raises(CheckpointError, match="'gemma2.attention.sliding_window' is missing"):
        load_pretrained(no_window)

    def bad_pattern(w):
        w.add_sliding_window(4)
        w.add_array("gemma2.attention.sliding_window_pattern", [True, False, True])

    path = write_gguf(
        tmp_path / "bp.gguf",
        model.state_dict(),
        arch="gemma2",
        head_dim=GEMMA_HD,
        metadata=bad_pattern,
    )
    with pytest.raises(CheckpointError, match="has 3 flags for 2 layers"):
        load_pretrained(path)


def test_gemma2_gguf_soft_caps_from_the_file(tmp_path):
    """Caps the file names (small, so they bite) are used; transformers' GGUF reader ignores
    them, so the source model is the oracle here."""
    model = _gemma2(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    path = _gemma2_file(model, tmp_path / "g2caps.gguf", caps=(2.0, 3.0))
    config = _equals_source_and_transformers(model, path, seed=4, transformers_reads_it=False)
    assert (config.attn_softcap, config.final_softcap) == (2.0, 3.0)


@pytest.mark.parametrize("scaled", [False, True])
def test_gemma3_gguf_equals_transformers_loading_it(tmp_path, scaled):
    """A Gemma 3 GGUF: six layers (the sixth global, as llama.cpp's fixed pattern says), q/k
    norms stored as 1 + w like the others, the local RoPE base 10000 and the file's global base
    (with its linear scaling, which transformers' GGUF reader ignores: source model only)."""
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    }
    if scaled:
        rope["full_attention"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
    model = _tiny(
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        initializer_range=GEMMA_INIT,
        layers=6,
        head_dim=GEMMA_HD,
        query_pre_attn_scalar=GEMMA_HD,
        sliding_window=4,
        rope_parameters=rope,
        rope_theta=1e6,
    )

    def metadata(w):
        w.add_sliding_window(4)
        if scaled:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(4.0)

    path = write_gguf(
        tmp_path / "g3.gguf",
        model.state_dict(),
        arch="gemma3",
        head_dim=GEMMA_HD,
        layers=6,
        theta=1e6,
        metadata=metadata,
    )
    config = _equals_source_and_transformers(model, path, seed=5, transformers_reads_it=not scaled)
    assert config.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 10000.0)
    assert config.qk_norm == "head" and config.attn_softcap is None


def test_olmo2_gguf_equals_its_source(tmp_path):
    """An OLMo 2 GGUF: norms after each sublayer, q/k norms over the whole projection, q/k rows
    in Hugging Face order (llama.cpp runs olmo2 with NEOX RoPE). transformers cannot read
    olmo2 GGUF files, so the source model is the oracle."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _tiny(transformers.Olmo2Config, transformers.Olmo2ForCausalLM, **ids)
    path = write_gguf(tmp_path / "olmo2.gguf", model.state_dict(), arch="olmo2")
    config = _equals_source_and_transformers(model, path, seed=6, transformers_reads_it=False)
    assert config.block_norms == "post" and config.qk_norm == "flat"


def test_smollm3_gguf_equals_its_source(tmp_path):
    """A SmolLM3 GGUF: q/k rows permuted as for llama, no RoPE on every 4th layer (llama.cpp's
    fixed step), tied embeddings. transformers cannot read smollm3 GGUF files."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _tiny(transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, layers=4, **ids)
    state = model.state_dict()
    path = write_gguf(tmp_path / "smollm3.gguf", state, arch="smollm3", layers=4, tied=True)
    config = _equals_source_and_transformers(model, path, seed=7, transformers_reads_it=False)
    assert config.rope_layers == (True, True, True, False) and config.tie_embeddings


def test_phi3_gguf_equals_transformers_loading_it(tmp_path):
    """A Phi-3 GGUF keeps the fused attn_qkv and ffn_up (gate and up) tensors; jaxkv splits
    them at load."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _tiny(transformers.Phi3Config, transformers.Phi3ForCausalLM, **ids)
    path = write_gguf(tmp_path / "phi3.gguf", model.state_dict(), arch="phi3")
    _equals_source_and_transformers(model, path, seed=2)


@pytest.mark.parametrize(
    ("qtype", "levels"), [(Q.F16, None), (Q.BF16, None), (Q.Q8_0, 127), (Q.Q4_0, 8), (Q.Q4_1, 15)]
)
def test_quantized_weights_within_their_step(hf_model, tmp_path, qtype, levels):
    """Each block of 32 holds its values to within half a quantization step of its range
    (plus the float16 rounding of the stored scale)."""
    path = write_gguf(tmp_path / "q.gguf", hf_model.state_dict(), qtype=qtype)
    w = read_gguf(path).weights
    name = "model.layers.1.mlp.down_proj.weight"
    want = hf_model.state_dict()[name].numpy()
    got = w.get(name, want.shape)
    if levels is None:
        rel = 2**-8 if qtype == Q.BF16 else 2**-11
        np.testing.assert_allclose(got, want, rtol=rel, atol=1e-7)
        return
    blocks_want, blocks_got = want.reshape(-1, 32), got.reshape(-1, 32)
    scale = np.abs(blocks_want).max(1, keepdims=True) / levels
    if qtype == Q.Q4_1:  # min + d * q, d = range / 15
        scale = np.ptp(blocks_want, axis=1, keepdims=True) / levels
    # Half a step, plus the rounding of the float16 scale (and minimum) the block stores.
    f16 = 2**-10 * (levels * scale + np.abs(blocks_want).max(1, keepdims=True))
    err = np.abs(blocks_got - blocks_want)
    # Q4_0 maps the largest magnitude to -8 steps, so the other end reaches only +7: values
    # there are off by up to a whole step.
    steps = 1.0 if qtype == Q.Q4_0 else 0.5
    assert (err <= scale * steps + f16 + 1e-7).all(), (err / scale).max()
    assert (err > 0).any()  # really quantized
    # q and k come back in transformers' row order.
    q = w.get("model.layers.0.self_attn.q_proj.weight", (D, D))
    q_want = hf_model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.corrcoef(q.ravel(), q_want.ravel())[0, 1] > 0.95


def _pack_q4_k(rng, rows):
    """Hand-packed Q4_K blocks (llama.cpp's block_q4_K: d, dmin, 12 scale bytes, 128 nibble
    bytes) and the values they hold."""
    out, vals = [], []
    for _ in range(rows):
        d, dmin = np.float16(0.5), np.float16(0.25)
        sc, mn = rng.integers(1, 16, 8), rng.integers(0, 16, 8)
        q = rng.integers(0, 16, 256)
        scales = np.concatenate([sc[:4], mn[:4], sc[4:] | (mn[4:] << 4)]).astype(np.uint8)
        qs = np.concatenate(
            [q[64 * c : 64 * c + 32] | (q[64 * c + 32 : 64 * c + 64] << 4) for c in range(4)]
        ).astype(np.uint8)
        head = np.array([d, dmin], np.float16).view(np.uint8)
        out.append(np.concatenate([head, scales, qs]))
        sub = np.repeat(np.arange(8), 32)
        vals.append(float(d) * sc[sub] * q - float(dmin) * mn[sub])
    return np.stack(out), np.stack(vals).astype(np.float32)


def _pack_q6_k(rng, rows):
    """Hand-packed Q6_K blocks (block_q6_K: 128 low-nibble bytes, 64 high-bit bytes, 16 int8
    scales, d) and the values they hold."""
    out, vals = [], []
    for _ in range(rows):
        d = np.float16(0.125)
        sc = rng.integers(-20, 21, 16).astype(np.int8)
        q = rng.integers(0, 64, 256)
        ql, qh, y = np.zeros(128, np.uint8), np.zeros(64, np.uint8), np.zeros(256)
        for h in range(2):
            b = 128 * h
            for lane in range(32):
                q1, q2, q3, q4 = (q[b + lane + 32 * k] for k in range(4))
                ql[64 * h + lane] = (q1 & 15) | ((q3 & 15) << 4)
                ql[64 * h + lane + 32] = (q2 & 15) | ((q4 & 15) << 4)
                qh[32 * h + lane] = (
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
                )
                for k in range(4):
                    s = sc[8 * h + lane // 16 + 2 * k]
                    y[b + 32 * k + lane] = float(d) * s * (q[b + 32 * k + lane] - 32)
        out.append(np.concatenate([ql, qh, sc.view(np.uint8), np.array([d]).view(np.uint8)]))
        vals.append(y)
    return np.stack(out), np.stack(vals).astype(np.float32)


def test_k_quants_hand_packed(hf_model, tmp_path):
    rng = np.random.default_rng(0)
    q4, q4_vals = _pack_q4_k(rng, FFN)
    q6, q6_vals = _pack_q6_k(rng, D)
    raw = {"blk.0.ffn_up.weight": (q4, Q.Q4_K), "blk.1.ffn_down.weight": (q6, Q.Q6_K)}
    path = write_gguf(tmp_path / "k.gguf", hf_model.state_dict(), raw=raw)
    w = read_gguf(path).weights
    np.testing.assert_array_equal(w.get("model.layers.0.mlp.up_proj.weight", (FFN, D)), q4_vals)
    np.testing.assert_array_equal(w.get("model.layers.1.mlp.down_proj.weight", (D, FFN)), q6_vals)


def test_unsupported_things_are_named(hf_model, tmp_path):
    state = hf_model.state_dict()
    t = state["model.layers.0.mlp.up_proj.weight"].numpy()
    raw = {"blk.0.ffn_up.weight": (gguf.quants.quantize(t, Q.TQ1_0), Q.TQ1_0)}
    with pytest.raises(CheckpointError, match="stored as TQ1_0.*supported: F32"):
        load_pretrained(write_gguf(tmp_path / "t.gguf", state, raw=raw))
    with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported"):
        load_pretrained(write_gguf(tmp_path / "a.gguf", state, arch="falcon"))
    path = write_gguf(tmp_path / "s.gguf", state, tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
        load_tokenizer(path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_pretrained(tmp_path / "x.gguf")


def test_tokenizer_matches_transformers(f32_file):
    tok = load_tokenizer(f32_file)
    ref = transformers.AutoTokenizer.from_pretrained(str(f32_file.parent), gguf_file=f32_file.name)
    for text in ["the theater in a there", "<|im_start|>user\nhi <|im_end|>\n", "ünï ≈ 12"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(
            ref.encode(text), skip_special_tokens=True
        )
    assert tok.eos_ids == (len(TOKENS) + 2,)
    assert tok.pad_id == len(TOKENS)
    assert tok.chat_template == TEMPLATE


def test_convert_writes_a_directory_transformers_opens(hf_model, f32_file, tmp_path):
    from jaxkv.cli import main

    out = tmp_path / "hf"
    assert main(["convert", str(f32_file), str(out)]) == 0
    _config, params = load_pretrained(out)
    _, direct = load_pretrained(f32_file)
    for a, b in zip(
        jaxkv.model.jax.tree.leaves(params), jaxkv.model.jax.tree.leaves(direct), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    seq = torch.tensor([[5, 9, 260, 2, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(
            model(seq).logits.numpy(), hf_model(seq).logits.numpy(), atol=1e-4
        )
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("the <|im_end|>") == load_tokenizer(f32_file).encode("the <|im_end|>")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert load_tokenizer(out).chat_template == TEMPLATE
