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
from jaxkv.checkpoint import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    load_pretrained,
    save_pretrained,
)

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
SMALL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
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
    # q/k RMSNorm over head_dim before RoPE; head_dim 24, not hidden / heads = 16.
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=24),
    "qwen3-biases-tied": lambda: transformers.Qwen3Config(
        **LLAMA_LIKE, head_dim=8, attention_bias=True, tie_word_embeddings=True
    ),
    # No RoPE on every 2nd layer (the default is every 4th), tied embeddings.
    "smollm3": lambda: transformers.SmolLM3Config(
        **LLAMA_LIKE, **SMALL_IDS, no_rope_layer_interval=2
    ),
    # Norms after each sublayer (none before), q/k norms over the whole projection.
    "olmo2": lambda: transformers.Olmo2Config(**LLAMA_LIKE, **SMALL_IDS),
    # (1 + w) norms around each sublayer, scaled embeddings, GeGLU, query_pre_attn_scalar,
    # attention and final soft-capping (small caps so they bite), alternating windows.
    "gemma2": lambda: transformers.Gemma2Config(
        **{**LLAMA_LIKE, "num_hidden_layers": 3},
        head_dim=16,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        sliding_window=4,
    ),
    # Gemma 2 without soft-capping, with (1 + w) q/k norms over head_dim and two rotary bases
    # (local layers 10000, global 1e6 with linear scaling).
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**LLAMA_LIKE, "num_hidden_layers": 3},
        head_dim=16,
        query_pre_attn_scalar=12,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        },
    ),
    # Fused qkv_proj and gate_up_proj, split at load (saved back as llama).
    "phi3": lambda: transformers.Phi3Config(**LLAMA_LIKE, **SMALL_IDS),
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
    with torch.no_grad():  # norms start at one: make each scale matter (and differ)
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname:
                p.uniform_(0.5, 1.5)
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
# Gemma 2 (norms scaled by 1 + w around each sublayer, soft-capped logits within +-3 here):
# transformers' own bf16 run is 0.26 off its float32 logits (0.064 x (1 + 3.0)), jaxkv's 0.21.
BF16_TOLERANCE_BY_FAMILY = {"gemma2": 0.08}


def test_bf16_load_runs_and_stays_close(family):
    name, model, path = family
    config, params = load_pretrained(path, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    seq = _prompts()[2]
    ref = _hf_logits(model, seq)
    got = np.asarray(jaxkv.forward(params, config, [seq]))[0]
    assert np.isfinite(got).all()
    tol = BF16_TOLERANCE_BY_FAMILY.get(name, BF16_TOLERANCE)
    assert np.abs(got - ref).max() < tol * (1 + np.abs(ref).max()), name
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


def test_weight_table_maps_every_tensor_both_ways(family):
    """The family's one table (jaxkv.weight_map) gives back exactly the tensors transformers
    holds, bit for bit, from the params it loaded, and builds those params again from them."""
    from jaxkv import weight_map
    from jaxkv.checkpoint import _IGNORED_SUFFIXES

    _, model, path = family
    config, params = load_pretrained(path, dtype=jnp.float32)
    table = weight_map.TABLES[json.loads((path / "config.json").read_text())["model_type"]]
    host = jax.tree.map(np.asarray, params)
    tensors = weight_map.from_params(table, host, config)
    theirs = {
        k: v.numpy()
        for k, v in model.state_dict().items()
        if not k.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_embeddings and k == "lm_head.weight")
    }
    assert sorted(tensors) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    again = weight_map.to_params(table, lambda name, shape: tensors[name], config)
    jax.tree.map(np.testing.assert_array_equal, again, host)


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


# --------------------------------------------------------------------------- per-layer windows

FULL, SLIDE = "full_attention", "sliding_attention"
WINDOW = 5
WINDOW_SEQ_LEN = 16  # over 3 windows: every sliding layer drops keys
THREE_LAYERS = {**LLAMA_LIKE, "num_hidden_layers": 3}
# (transformers config, config.json entries to change after saving, the windows per layer that
# transformers applies). Each windowed layer's attention changes the logits (checked below).
WINDOWED = {
    # Qwen2: with use_sliding_window, layers i >= max_window_layers slide.
    "qwen2-max-window-layers": (
        lambda: transformers.Qwen2Config(
            **THREE_LAYERS, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        ),
        {},
        (None, WINDOW, WINDOW),
    ),
    "qwen2-max-window-layers-0": (
        lambda: transformers.Qwen2Config(
            **THREE_LAYERS, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0
        ),
        {},
        (WINDOW,) * 3,
    ),
    # An explicit layer_types list wins over max_window_layers.
    "qwen2-layer-types": (
        lambda: transformers.Qwen2Config(
            **THREE_LAYERS,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            layer_types=[SLIDE, FULL, SLIDE],
        ),
        {},
        (WINDOW, None, WINDOW),
    ),
    # transformers reads the legacy name "attention" as full_attention.
    "qwen2-legacy-attention-name": (
        lambda: transformers.Qwen2Config(
            **THREE_LAYERS, use_sliding_window=True, sliding_window=WINDOW
        ),
        {"layer_types": ["attention", SLIDE, "attention"]},
        (None, WINDOW, None),
    ),
    # Qwen3 decides as Qwen2 does (and its per-layer caches follow).
    "qwen3-max-window-layers": (
        lambda: transformers.Qwen3Config(
            **THREE_LAYERS,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        ),
        {},
        (None, WINDOW, WINDOW),
    ),
    # SmolLM3 with use_sliding_window: its NoPE layers slide by default.
    "smollm3-nope-layers-slide": (
        lambda: transformers.SmolLM3Config(
            **THREE_LAYERS,
            **SMALL_IDS,
            no_rope_layer_interval=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
        ),
        {},
        (None, WINDOW, None),
    ),
    "ministral-layer-types": (
        lambda: transformers.MinistralConfig(
            **THREE_LAYERS, head_dim=16, sliding_window=WINDOW, layer_types=[FULL, SLIDE, FULL]
        ),
        {},
        (None, WINDOW, None),
    ),
    # AutoConfig reads a mistral config.json with layer_types as ministral.
    "mistral-with-layer-types": (
        lambda: transformers.MistralConfig(**THREE_LAYERS, sliding_window=WINDOW),
        {"layer_types": [SLIDE, SLIDE, FULL]},
        (WINDOW, WINDOW, None),
    ),
    # LlamaModel has no window: it ignores layer_types and sliding_window.
    "llama-ignores-layer-types": (
        lambda: transformers.LlamaConfig(**THREE_LAYERS),
        {"layer_types": [SLIDE, FULL, SLIDE], "sliding_window": WINDOW},
        (None, None, None),
    ),
}


def _window_prompts():
    rng = np.random.default_rng(2)
    return [rng.integers(0, VOCAB, size=WINDOW_SEQ_LEN).tolist() for _ in range(2)]


@pytest.fixture(scope="module", params=sorted(WINDOWED))
def windowed(request, tmp_path_factory):
    """(name, hf_model, checkpoint dir, expected windows) for one per-layer window case; the
    model is the one transformers opens from the (edited) directory."""
    make, edits, windows = WINDOWED[request.param]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    transformers.AutoModelForCausalLM.from_config(make()).save_pretrained(path)
    if edits:
        hf = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**hf, **edits}))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    return request.param, model, path, windows


def test_per_layer_windows_match_transformers(windowed):
    name, model, path, windows = windowed
    config, params = load_pretrained(path, dtype=jnp.float32)
    assert config.layer_windows == windows, name
    alike = len(set(windows)) == 1
    assert (config.layer_types is None) == alike, name  # uniform layers: the simplest config
    for seq in _window_prompts():
        ref = _hf_logits(model, seq)
        got = np.asarray(jaxkv.forward(params, config, [seq]))[0]
        assert np.abs(got - ref).max() < 1e-4, name
        if set(windows) != {None}:  # the windows matter: without them the logits differ
            unwindowed = config.replace(sliding_window=None, layer_types=None)
            plain = np.asarray(jaxkv.forward(params, unwindowed, [seq]))[0]
            assert np.abs(plain - ref).max() > 0.1, name


def test_per_layer_windows_save_and_open_in_transformers(windowed, tmp_path):
    name, model, path, _ = windowed
    config, params = load_pretrained(path, dtype=jnp.float32)
    out = save_pretrained(params, config, tmp_path / "saved")
    config2, params2 = load_pretrained(out)
    assert config2 == config, name
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    seq = _window_prompts()[0]
    np.testing.assert_array_equal(_hf_logits(reloaded, seq), _hf_logits(model, seq))


@pytest.mark.parametrize(
    "qkv_bias,layer_types,model_type",
    [
        (False, (SLIDE, FULL, SLIDE), "ministral"),
        (True, (FULL, SLIDE, SLIDE), "qwen2"),
        (True, (SLIDE, FULL, SLIDE), "qwen2"),
    ],
)
def test_jaxkv_mixed_window_model_opens_in_transformers(
    qkv_bias, layer_types, model_type, tmp_path
):
    cfg = jaxkv.ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=64,
        qkv_bias=qkv_bias,
        sliding_window=4,
        layer_types=layer_types,
    )
    params = jaxkv.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p * 5, params)  # larger weights: peaked logits
    save_pretrained(params, cfg, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == model_type
    assert hf["layer_types"] == list(layer_types) and hf["sliding_window"] == 4
    if model_type == "qwen2":
        assert hf["use_sliding_window"] and hf["max_window_layers"] == layer_types.index(SLIDE)
    assert load_pretrained(tmp_path)[0] == cfg
    seq = [int(t) for t in np.random.default_rng(3).integers(0, 50, size=WINDOW_SEQ_LEN)]
    ours = np.asarray(jaxkv.forward(params, cfg, [seq]))[0]
    for attn_implementation in ("eager", "sdpa"):  # sdpa takes the window from the mask too
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, attn_implementation=attn_implementation
        ).eval()
        assert np.abs(ours - _hf_logits(model, seq)).max() < 1e-4, attn_implementation


def _qwen2_json(**changes):
    """A tiny qwen2 config.json dict (no weights needed to read a config)."""
    hf = transformers.Qwen2Config(**THREE_LAYERS).to_dict()
    hf.pop("layer_types", None)  # as in configs written before transformers had the field
    return {**hf, **changes}


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            dict(layer_types=[FULL, "chunked_attention", SLIDE], use_sliding_window=True),
            r"layer_types has \['chunked_attention'\], which jaxkv does not support",
        ),
        (dict(layer_types=[FULL, SLIDE], use_sliding_window=True), "2 entries but num_hidden"),
        (dict(layer_types="full_attention"), "must be a list of strings"),
        (
            dict(layer_types=[FULL, SLIDE, SLIDE], use_sliding_window=False),
            r"no sliding_window \(use_sliding_window is false\)",
        ),
        (
            dict(layer_types=[FULL, SLIDE, SLIDE], use_sliding_window=True, sliding_window=0),
            "sliding_window must be a positive int, got 0",
        ),
    ],
)
def test_bad_layer_types_in_config_json(changes, match):
    with pytest.raises(CheckpointError, match=match):
        config_from_hf(_qwen2_json(**changes))


def test_unknown_layer_type_in_checkpoint_dir(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_types"] = ["chunked_attention", FULL]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="chunked_attention"):
        load_pretrained(path)


def test_qwen2_window_fields_without_a_window_load_as_full_attention():
    # Qwen2.5's own configs: a sliding_window and max_window_layers, use_sliding_window off.
    for changes in (
        dict(use_sliding_window=False, sliding_window=32768, max_window_layers=2),
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
        dict(use_sliding_window=True, sliding_window=None, max_window_layers=0),
        dict(layer_types=[FULL] * 3, use_sliding_window=True, sliding_window=WINDOW),
    ):
        cfg = config_from_hf(_qwen2_json(**changes))
        assert (cfg.sliding_window, cfg.layer_types) == (None, None), changes


def test_windowed_configs_round_trip_through_hf_dicts():
    base = jaxkv.ModelConfig(
        vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48
    )
    for changes in (
        dict(sliding_window=7),
        dict(sliding_window=7, layer_types=(FULL, FULL, SLIDE)),
        dict(sliding_window=7, layer_types=(SLIDE, FULL, FULL), qkv_bias=True),
        dict(sliding_window=7, qkv_bias=True),
        dict(qkv_bias=True),
    ):
        cfg = base.replace(**changes)
        assert config_from_hf(config_to_hf(cfg)) == cfg, changes


@pytest.mark.parametrize(
    "changes",
    [
        dict(qkv_bias=True, out_bias=True),
        dict(mlp_bias=True),
        dict(qkv_bias=True, mlp_bias=True),
    ],
)
def test_window_with_output_or_mlp_biases_has_no_hf_type(changes):
    cfg = jaxkv.ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_dim=48,
        sliding_window=4,
        layer_types=(FULL, SLIDE),
        **changes,
    )
    with pytest.raises(CheckpointError, match="sliding window with output or MLP biases"):
        config_to_hf(cfg)


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
        CheckpointError,
        match="'falcon' is not supported; supported: llama, mistral, ministral, qwen2, qwen3, "
        "smollm3, olmo2, gemma2, gemma3_text, gemma3, phi3, gpt2",
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


def test_phi3_longrope_and_partial_rotary_are_refused():
    """Phi-3.5's longrope scaling and a partial rotary factor are not implemented: loading
    such a config raises, naming what is not supported."""
    hf = transformers.Phi3Config(**LLAMA_LIKE, **SMALL_IDS).to_dict()
    long = {**hf, "rope_parameters": None}
    long["rope_scaling"] = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
    }
    with pytest.raises(CheckpointError, match="rope scaling type 'longrope' is not supported"):
        config_from_hf(long)
    with pytest.raises(CheckpointError, match="partial_rotary_factor=0.5 is not supported"):
        config_from_hf({**hf, "partial_rotary_factor": 0.5})
    assert config_from_hf(hf).n_layers == 2


def _gemma3_multimodal(tmp_path):
    """A tiny multimodal Gemma 3 (SigLIP vision tower, projector, text decoder), saved by
    transformers; image token ids 5-7 stay out of the text prompts."""
    torch.manual_seed(0)
    text = FAMILIES["gemma3"]()
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=5,
        boi_token_index=6,
        eoi_token_index=7,
    )
    cfg.text_config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    return model


def test_gemma3_multimodal_checkpoint_loads_its_text_decoder(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (`gemma3`) loads as its text decoder: the
    config is the text_config's, the vision tower and projector are left unread, and the logits
    of text prompts equal transformers' multimodal model within 1e-4, for both of transformers'
    weight layouts (`language_model.model.*` and `model.language_model.*`)."""
    from safetensors.numpy import load_file, save_file

    model = _gemma3_multimodal(tmp_path / "mm")
    config, params = load_pretrained(tmp_path / "mm", dtype=jnp.float32)
    text_config = config_from_hf(
        {**model.config.text_config.to_dict(), "model_type": "gemma3_text"}
    )
    assert config == text_config.replace(tie_embeddings=True)
    seqs = [[9, 40, 11, 100, 23, 57, 8, 19, 33, 71, 90, 14], [60, 12, 8]]
    for seq in seqs:
        got = np.asarray(jaxkv.forward(params, config, np.asarray([seq]))[0])
        np.testing.assert_allclose(got, _hf_logits(model, seq), atol=1e-4)
    # The newer layout: the same tensors under model.language_model.*, vision under model.*.
    tensors = load_file(str(tmp_path / "mm" / "model.safetensors"))
    renamed = {
        k.replace("language_model.model.", "model.language_model.", 1)
        .replace("vision_tower.", "model.vision_tower.", 1)
        .replace("multi_modal_projector.", "model.multi_modal_projector.", 1): v
        for k, v in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    (tmp_path / "new").mkdir()
    save_file(renamed, str(tmp_path / "new" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tmp_path / "mm" / "config.json", tmp_path / "new" / "config.json")
    config2, params2 = load_pretrained(tmp_path / "new", dtype=jnp.float32)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # A text tensor missing is named under the checkpoint's own spelling.
    del renamed["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(renamed, str(tmp_path / "new" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.language_model.layers.1.mlp.up_proj"):
        load_pretrained(tmp_path / "new")
