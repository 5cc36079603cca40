"""Each family's chat template and special tokens, against transformers' apply_chat_template.

The templates in fixtures/chat_templates are the families' own (Gemma 2, Gemma 3, Qwen3,
OLMo 2, Phi-3, Llama 3, SmolLM2), written out for these tests; each test builds a small
byte-level tokenizer.json holding that family's special tokens, so the checks are about the
rendering, the special-token splitting and the end of turn, not about a real vocabulary:
- the rendered text equals transformers' `apply_chat_template` (with and without the
  generation prompt, a system message where the family has one, multi-turn history);
- the token ids `jaxkv chat` feeds the model equal transformers' tokenized chat (no second
  BOS from the tokenizer's post-processor);
- the chat stops at the family's end of turn (Gemma's `<end_of_turn>` though its EOS is
  `<eos>`, Qwen's `<|im_end|>`, Phi-3's `<|end|>`, Llama 3's `<|eot_id|>`), in `Conversation`
  and in `jaxkv chat`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax.numpy as jnp
import pytest
from helpers import tiny_cfg

from jaxkv.chat import Conversation, chat_stop_ids, end_of_turn_ids, render_chat
from jaxkv.tokenizer import load_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# family: (special tokens in id order, bos, eos, end of turn, takes a system message,
#          added tokens that are not special, whether the tokenizer itself adds BOS)
FAMILIES = {
    "gemma2": (
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        False,
        [],
        True,
    ),
    "gemma3": (
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        True,
        ["<start_of_image>"],
        True,
    ),
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|im_end|>",
        True,
        ["<think>", "</think>", "<tool_call>", "</tool_call>"],
        False,
    ),
    "olmo2": (
        ["<|endoftext|>", "<|pad|>"],
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        True,
        [],
        False,
    ),
    "phi3": (
        [
            "<unk>",
            "<s>",
            "</s>",
            "<|endoftext|>",
            "<|assistant|>",
            "<|end|>",
            "<|system|>",
            "<|user|>",
        ],
        "<s>",
        "<|endoftext|>",
        "<|end|>",
        True,
        [],
        True,
    ),
    "llama3": (
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        True,
        [],
        True,
    ),
    "smollm2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        True,
        [],
        False,
    ),
}
EXTRA = {"date_string": "29 Nov 2026"}  # Llama 3 would otherwise print today's date


def _tokenizer_dir(tmp_path: Path, family: str) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    special, bos, eos, _, _, plain, adds_bos = FAMILIES[family]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    if adds_bos:  # encode(text) adds BOS, as these families' tokenizers do
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    path = tmp_path / family
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "chat_template": (TEMPLATES / f"{family}.jinja").read_text().rstrip("\n"),
        "model_max_length": 4096,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _conversations(system: bool) -> list[list[dict]]:
    turns = [
        {"role": "user", "content": "What is the capital of France? "},
        {"role": "assistant", "content": "  Paris.\n"},
        {"role": "user", "content": "And of Germany?"},
    ]
    out = [turns[:1], turns]
    if system:
        out.append([{"role": "system", "content": "Answer in one word."}, *turns])
    return out


def _hf_ids(hf_tok, messages):
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **EXTRA)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rendered_chat_equals_transformers(tmp_path, family):
    from transformers import AutoTokenizer

    path = _tokenizer_dir(tmp_path, family)
    tok = load_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    system = FAMILIES[family][4]
    for messages in _conversations(system):
        for gen in (True, False):
            ref = hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen, **EXTRA
            )
            got = render_chat(
                tok.chat_template,
                messages,
                add_generation_prompt=gen,
                bos_token=tok.bos_token,
                eos_token=tok.eos_token,
                **EXTRA,
            )
            assert got == ref
        # The ids the chat runs: the template's own specials, no BOS added a second time.
        cfg, params = tiny_cfg(vocab_size=tok.vocab_size)
        chat = Conversation(params, cfg, tok, capacity=512, chat_template_kwargs=EXTRA)
        assert chat.render(messages) == _hf_ids(hf, messages)
    if not system:  # the template refuses a system turn, in both renderers
        sys_first = _conversations(True)[-1]
        with pytest.raises(Exception, match="System role not supported"):
            hf.apply_chat_template(sys_first, tokenize=False)
        with pytest.raises(Exception, match="System role not supported"):
            render_chat(tok.chat_template, sys_first, bos_token=tok.bos_token)


def test_qwen3_thinking_options_equal_transformers(tmp_path):
    """Qwen3's template splits `<think>` reasoning out of earlier replies and takes
    `enable_thinking=False`; both render as transformers does."""
    from transformers import AutoTokenizer

    path = _tokenizer_dir(tmp_path, "qwen3")
    tok = load_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
    ]
    for extra in ({}, {"enable_thinking": False}):
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        assert render_chat(tok.chat_template, messages, **extra) == ref
    assert "<think>" not in render_chat(tok.chat_template, messages)  # stripped from history
    assert render_chat(tok.chat_template, messages, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_stops_at_the_family_end_of_turn(tmp_path, family):
    """The end of turn comes from the template (Gemma's configs name only `<eos>`); a model
    that always predicts it ends every reply at once, with stop_reason "end_of_turn"."""
    path = _tokenizer_dir(tmp_path, family)
    tok = load_tokenizer(path)
    _, _, eos, eot, _, plain, _ = FAMILIES[family]
    eot_id = tok._tok.token_to_id(eot)
    assert end_of_turn_ids(tok) == (eot_id,)
    assert set(chat_stop_ids(tok)) == {tok._tok.token_to_id(eos), eot_id}
    assert not {tok._tok.token_to_id(t) for t in plain} & tok.special_ids
    cfg, params = _always(eot_id, tok.vocab_size)
    chat = Conversation(params, cfg, tok, capacity=512)
    text, ids = chat.reply_text([{"role": "user", "content": "hi"}], max_new_tokens=8)
    assert (text, ids, chat.stop_reason) == ("", [], "end_of_turn")


def _always(token: int, vocab: int):
    """A tiny model whose greedy choice is always `token`: the residual stream's first
    coordinate is a positive constant (embeddings hold 1 there, no sublayer writes it), and
    only `token`'s output row reads it."""
    cfg, params = tiny_cfg(vocab_size=vocab)
    params = dict(params)
    params["embed"] = params["embed"].at[:, 0].set(1.0)
    for name, layer in params.items():
        if name.startswith("layers_"):
            layer = {**layer, "attn": dict(layer["attn"]), "mlp": dict(layer["mlp"])}
            layer["attn"]["o"] = layer["attn"]["o"].at[..., 0].set(0.0)
            layer["mlp"]["wo"] = layer["mlp"]["wo"].at[:, 0].set(0.0)
            params[name] = layer
    params["lm_head"] = jnp.zeros_like(params["lm_head"]).at[0, token].set(10.0)
    return cfg, params


def test_jaxkv_chat_cli_ends_gemma_turns_at_end_of_turn(tmp_path, monkeypatch, capsys):
    """`jaxkv chat --model DIR` on a Gemma-tokenized checkpoint: each reply ends at
    `<end_of_turn>` (not at max_new_tokens), turn after turn."""
    from jaxkv import cli
    from jaxkv.checkpoint import save_pretrained

    path = _tokenizer_dir(tmp_path, "gemma2")
    tok = load_tokenizer(path)
    cfg, params = _always(tok._tok.token_to_id("<end_of_turn>"), tok.vocab_size)
    save_pretrained(params, cfg, path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand again\n"))
    assert cli.main(["chat", "--model", str(path), "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("[jaxkv] turn") == 2
    assert "stopped at" not in err
    # Template variables must be a JSON object: a usage error (status 2) naming the value.
    assert cli.main(["chat", "--model", str(path), "--template-kwargs", "[1]"]) == 2
    assert "must be a JSON object, got '[1]'" in capsys.readouterr().err


def test_jaxkv_chat_cli_passes_template_kwargs(tmp_path, monkeypatch, capsys):
    """`--template-kwargs '{"enable_thinking": false}'` reaches Qwen3's template: the turn
    prefills the empty think block too (4 more tokens than without)."""
    from jaxkv import cli
    from jaxkv.checkpoint import save_pretrained

    path = _tokenizer_dir(tmp_path, "qwen3")
    tok = load_tokenizer(path)
    cfg, params = _always(tok._tok.token_to_id("<|im_end|>"), tok.vocab_size)
    save_pretrained(params, cfg, path)
    prefilled = []
    for extra in ([], ["--template-kwargs", '{"enable_thinking": false}']):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
        assert cli.main(["chat", "--model", str(path), "--temperature", "0", *extra]) == 0
        turn = next(x for x in capsys.readouterr().err.splitlines() if "turn 1" in x)
        prefilled.append(int(turn.split("prefilled ")[1].split()[0]))
    think = tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert prefilled[1] - prefilled[0] == len(think)
    bad = ["chat", "--model", str(path), "--template-kwargs", '{"add_generation_prompt": false}']
    assert cli.main(bad) == 2
    assert "cannot set ['add_generation_prompt']" in capsys.readouterr().err
