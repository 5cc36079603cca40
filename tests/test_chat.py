"""Chat templates and `Conversation` on a tiny random byte-level model: every turn replies as a
fresh run over the whole rendered history does, prefilling only what the cache lacks and
rolling back what no longer matches."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_cfg

import jaxkv
from jaxkv.chat import Conversation, render_chat
from jaxkv.tokenizer import ByteTokenizer

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
NEWLINE = 10


class TemplatedBytes(ByteTokenizer):
    chat_template = TEMPLATE


def _model():
    return tiny_cfg(vocab_size=ByteTokenizer.vocab_size)


def _fresh_reply(params, cfg, ids, n):
    out = jaxkv.generate(params, cfg, [ids], max_new_tokens=n, eos_ids=[NEWLINE])
    toks = np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist()
    return toks[:-1] if toks and toks[-1] == NEWLINE else toks


def test_render_chat():
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(TEMPLATE, msgs) == "<user>hi\n<assistant>"
    assert render_chat(TEMPLATE, msgs, add_generation_prompt=False) == "<user>hi\n"
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        render_chat(TEMPLATE, [{"content": "x"}])


def test_turns_equal_fresh_runs_and_prefill_only_new_tokens():
    cfg, params = _model()
    tok = TemplatedBytes(add_bos=False)
    chat = Conversation(params, cfg, tok, capacity=256, stop_ids=[NEWLINE], chunk_size=4)
    messages = []
    for turn, user in enumerate(["hello there", "and then?", "ok"]):
        messages.append({"role": "user", "content": user})
        ids = chat.render(messages)
        _, reply = chat.reply_text(messages, max_new_tokens=10)
        assert reply == _fresh_reply(params, cfg, ids, 10)
        assert chat.stop_reason in ("end_of_turn", "max_new_tokens")
        # The cache holds exactly the tokens the conversation says it holds.
        assert int(chat.cache.lengths[0]) == len(chat.tokens)
        assert chat.tokens == (ids + reply)[: len(chat.tokens)]
        if turn:  # only this turn's new tokens (and any rolled-back tail) were run
            assert chat.prefilled[-1] < len(ids) - 10
        messages.append({"role": "assistant", "content": tok.decode(reply)})


def test_rewritten_history_rolls_back():
    """Editing an earlier message: the cache keeps the common prefix only, and the reply is a
    fresh run's over the new history."""
    cfg, params = _model()
    tok = TemplatedBytes(add_bos=False)
    chat = Conversation(params, cfg, tok, capacity=256, stop_ids=[NEWLINE])
    first = [{"role": "user", "content": "abcdefgh"}]
    chat.reply_text(first, max_new_tokens=5)
    held = len(chat.tokens)
    edited = [{"role": "user", "content": "abcXefgh"}]
    ids = chat.render(edited)
    _, reply = chat.reply_text(edited, max_new_tokens=5)
    assert reply == _fresh_reply(params, cfg, ids, 5)
    assert chat.prefilled[-1] == len(ids) - len("<user>abc")  # kept "<user>abc" only
    assert held > len("<user>abc")


def test_stop_reasons_and_errors():
    cfg, params = _model()
    tok = TemplatedBytes(add_bos=False)
    msgs = [{"role": "user", "content": "x"}]
    greedy = jaxkv.generate(params, cfg, [tok.encode("<user>x\n<assistant>")], max_new_tokens=40)
    unused = next(t for t in range(256) if t not in np.asarray(greedy.tokens).tolist()[0])
    chat = Conversation(params, cfg, tok, capacity=256, stop_ids=[unused])
    _, reply = chat.reply_text(msgs, max_new_tokens=7)
    assert len(reply) == 7 and chat.stop_reason == "max_new_tokens"
    small = Conversation(params, cfg, tok, capacity=24, stop_ids=[unused], chunk_size=4)
    _, reply = small.reply_text(msgs, max_new_tokens=100)
    assert small.stop_reason == "capacity"
    assert len(reply) == 24 - len(small.render(msgs)) + 1  # every slot used, plus the pending
    held = list(chat.tokens)
    too_long = [{"role": "user", "content": "y" * 300}]
    with pytest.raises(ValueError, match=r"is 318 tokens, over the cache capacity 256"):
        list(chat.reply(too_long))
    assert chat.tokens == held  # nothing rolled back for a turn that could not run
    _, again = chat.reply_text(msgs, max_new_tokens=3)
    assert len(again) == 3 and chat.prefilled[-1] == 1  # the cache was kept: one token rerun
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        list(chat.reply(msgs, max_new_tokens=0))
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        Conversation(params, cfg, tok, chunk_size=0)
    with pytest.raises(ValueError, match="no chat template"):
        Conversation(params, cfg, ByteTokenizer())
