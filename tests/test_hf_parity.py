"""Logit and token parity with Hugging Face transformers (torch, CPU) on tiny random models of
every supported family, created and saved by transformers itself. Also save/load round trips
and checkpoint errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.checkpoint import CheckpointError, load_pretrained, save_pretrained

torch = pytest.importorskip("torch", reason="parity tests need torch (in the test extra)")
transformers = pytest.importorskip("transformers")

VOCAB = 120
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2)
LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **COMMON,
)
FAMILIES = {
    "llama-gqa": lambda: transformers.LlamaConfig(**LLAMA_LIKE, rope_theta=500.0),
    "llama-tied-llama3rope-biases": lambda: transformers.LlamaConfig(
        **LLAMA_LIKE,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral-window": lambda: transformers.MistralConfig(**LLAMA_LIKE, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=128, **COMMON
    ),
}
PROMPT_LENGTHS = [1, 5, 11, 3]
N_DECODE = 6
N_GREEDY = 32


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, hf_model, checkpoint dir) for one family."""
    torch.manual_seed(0)
    hf_config = FAMILIES[request.param]()
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def _hf_logits(model, seq):
    with torch.no_grad():
        out = model(torch.tensor([seq]))
    return out.logits[0].float().numpy()


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def test_logits_match_transformers_prefill_and_decode(family):
    name, model, path = family
    config, params = load_pretrained(path, dtype=jnp.float32)
    prompts = _prompts()
    # Feed the HF model's own greedy choices for a few decode steps.
    seqs = [list(p) for p in prompts]
    for _ in range(N_DECODE):
        for s in seqs:
            s.append(int(_hf_logits(model, s)[-1].argmax()))
    hf = [_hf_logits(model, s) for s in seqs]
    # Uncached forward over every position of every sequence.
    for s, ref in zip(seqs, hf, strict=True):
        got = np.asarray(jaxkv.forward(params, config, [s]))[0]
        assert np.abs(got - ref).max() < 1e-4, name
    # Ragged prefill, then decode steps.
    logits, cache = jaxkv.prefill(params, config, prompts, capacity=64)
    for b, p in enumerate(prompts):
        assert np.abs(np.asarray(logits[b]) - hf[b][len(p) - 1]).max() < 1e-4, name
    for t in range(N_DECODE):
        fed = jnp.array([s[len(p) + t] for s, p in zip(seqs, prompts, strict=True)])
        logits, cache = jaxkv.decode_step(params, config, cache, fed)
        for b, p in enumerate(prompts):
            diff = np.abs(np.asarray(logits[b]) - hf[b][len(p) + t]).max()
            assert diff < 1e-4, (name, t, b, diff)


def test_greedy_continuations_match_transformers(family):
    name, model, path = family
    config, params = load_pretrained(path, dtype=jnp.float32)
    prompts = _prompts()
    ours = np.asarray(jaxkv.generate(params, config, prompts, max_new_tokens=N_GREEDY).tokens)
    model.generation_config.eos_token_id = None  # compare whole continuations
    model.generation_config.pad_token_id = 0
    for b, p in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([p])  # an explicit mask: HF would mask tokens equal to pad_id
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_GREEDY, do_sample=False
            )
        assert out.shape[1] == len(p) + N_GREEDY
        assert ours[b].tolist() == out[0, len(p) :].tolist(), (name, b)


# bf16 stores ~3 significant digits; after 2 layers on random weights the logits (std ~1)
# drift by ~0.1 (measured 0.08-0.11 at max |logit| ~5.5). Documented bound:
# max |diff| < 0.05 * (1 + max |logit|).
BF16_TOLERANCE = 0.05


def test_bf16_load_runs_and_stays_close(family):
    name, model, path = family
    config, params = load_pretrained(path, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    seq = _prompts()[2]
    ref = _hf_logits(model, seq)
    got = np.asarray(jaxkv.forward(params, config, [seq]))[0]
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() < BF16_TOLERANCE * (1 + np.abs(ref).max()), name
    res = jaxkv.generate(params, config, [seq], max_new_tokens=4)
    assert res.tokens.shape == (1, 4)


def test_save_pretrained_round_trips_and_opens_in_transformers(family, tmp_path):
    _, model, path = family
    config, params = load_pretrained(path, dtype=jnp.float32)
    out = save_pretrained(params, config, tmp_path / "saved", max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").exists()  # small shards: a sharded index
    config2, params2 = load_pretrained(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    seq = _prompts()[1]
    np.testing.assert_array_equal(_hf_logits(reloaded, seq), _hf_logits(model, seq))


def test_jaxkv_model_saves_as_llama_and_matches_in_transformers(tmp_path):
    cfg = jaxkv.ModelConfig(
        vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=48, max_seq_len=64
    )
    params = jaxkv.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p * 5, params)  # larger weights: peaked logits
    save_pretrained(params, cfg, tmp_path, extra_config={"eos_token_id": 3})
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama" and hf_cfg["eos_token_id"] == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    seq = [1, 4, 9, 16, 25, 36]
    ours = np.asarray(jaxkv.forward(params, cfg, [seq]))[0]
    assert np.abs(ours - _hf_logits(model, seq)).max() < 1e-4


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES["llama-gqa"]())
    path = tmp_path_factory.mktemp("llama-errors")
    model.save_pretrained(path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_shape_mismatch_names_tensor_and_shapes(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.0.mlp.gate_proj.weight' "
        r"has shape \(96, 64\), but the config needs "
        r"\(80, 64\)",
    ):
        load_pretrained(path)


def test_unsupported_model_type_lists_supported(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match="'falcon' is not supported; supported: llama, mistral, qwen2, gpt2"
    ):
        load_pretrained(path)


def test_missing_and_corrupt_files_are_named(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_pretrained(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_missing_tensor_and_missing_shard(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy(llama_dir, tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match="'model.layers.1.self_attn.k_proj.weight' is missing"
    ):
        load_pretrained(path)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is listed"):
        load_pretrained(path)


def test_unexpected_tensor_is_an_error(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy(llama_dir, tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_norm"):
        load_pretrained(path)
