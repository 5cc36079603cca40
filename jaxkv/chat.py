"""Chat: render a model's chat template, and keep a conversation's KV cache between turns.

`render_chat(template, messages, ...)` renders a Hugging Face / GGUF chat template with jinja2
the way transformers' `apply_chat_template` does (sandboxed environment, `trim_blocks`,
`lstrip_blocks`, `raise_exception`, a `tojson` that does not escape HTML, `strftime_now`).

`Conversation` holds one conversation's cache and the tokens it holds. Each turn renders the
whole history, tokenizes it, and compares it with the tokens already in the cache: only the new
suffix is prefilled (`extend`). Where the rendered history differs from what is cached (a
template that rewrites earlier turns, or a reply whose text re-tokenizes differently), the cache
is rolled back to the common prefix first (`KVCache.truncate`), so a turn always sees exactly
the tokens a from-scratch run of the whole history would see.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import KVCache
from jaxkv.config import ModelConfig
from jaxkv.loops import DecodeState, Loop, _split, resume_jit
from jaxkv.model import Params
from jaxkv.prefill import PREFILL_CHUNK, attention_span, check_chunk, extend
from jaxkv.sampling import GREEDY, SamplingConfig, sample

Message = dict[str, str]


@functools.cache
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """The chat template rendered for `messages` (dicts with "role" and "content")."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    return _compile(template).render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
        **extra,
    )


_PROBE = "jaxkv end-of-turn probe 7f3a"


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
    """The special token a tokenizer's chat template writes right after an assistant message
    (Gemma's `<end_of_turn>`, Qwen's and SmolLM's `<|im_end|>`, Llama 3's `<|eot_id|>`,
    Phi-3's `<|end|>`), found by rendering a probe conversation; () when the template writes
    no special token there, or cannot render it. A model's configs often name only the
    end-of-text token as EOS (Gemma's config.json says `<eos>`), so a chat stops at this too."""
    template = getattr(tokenizer, "chat_template", None)
    special = getattr(tokenizer, "special_ids", frozenset())
    if not template or not special:
        return ()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat(
            template,
            messages,
            add_generation_prompt=False,
            bos_token=getattr(tokenizer, "bos_token", None),
            eos_token=getattr(tokenizer, "eos_token", None),
        )
    except Exception:  # a template that cannot render the probe names no end of turn
        return ()
    at = text.find(_PROBE)
    tail = text[at + len(_PROBE) :].lstrip(" ") if at >= 0 else ""
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    return (ids[0],) if ids and ids[0] in special else ()


def chat_stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """Where a chat reply ends: the tokenizer's EOS ids and its template's end of turn."""
    return tuple(dict.fromkeys((*tokenizer.eos_ids, *end_of_turn_ids(tokenizer))))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Conversation:
    """One conversation (batch of one) whose KV cache persists between turns.

    `reply(messages)` renders the history, prefills only what the cache lacks, and yields the
    reply's tokens in chunks as they are made; the reply stops at one of `stop_ids` (by
    default the tokenizer's EOS ids and its template's end of turn) or after `max_new_tokens`,
    or when the cache is full; `stop_reason` then says which ("end_of_turn", "max_new_tokens",
    "capacity"). `prefilled` records how many tokens each turn ran through the model before
    sampling. `chat_template_kwargs` go to the template (Qwen3's `enable_thinking=False`).
    """

    def __init__(
        self,
        params: Params,
        config: ModelConfig,
        tokenizer: Any,
        *,
        capacity: int = 4096,
        stop_ids: Sequence[int] | None = None,
        sampling: SamplingConfig = GREEDY,
        key: int = 0,
        chunk_size: int = 8,
        prefill_chunk: int = PREFILL_CHUNK,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this model's tokenizer has no chat template")
        for name, value in (("capacity", capacity), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_chunk(prefill_chunk)
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.template = template
        self.template_kwargs = dict(chat_template_kwargs or {})
        taken = sorted(
            {"messages", "add_generation_prompt", "bos_token", "eos_token"}
            & set(self.template_kwargs)
        )
        if taken:
            raise ValueError(f"chat_template_kwargs cannot set {taken}: the conversation does")
        self.capacity = capacity
        self.stop_ids = tuple(stop_ids if stop_ids is not None else chat_stop_ids(tokenizer))
        if not self.stop_ids:
            raise ValueError("a chat needs an end-of-turn token id (stop_ids)")
        self.sampling = sampling
        self.key = jax.random.key(key)
        self.chunk_size = chunk_size
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache.init(config, 1, capacity)
        self.tokens: list[int] = []  # what the cache holds, in order
        self.prefilled: list[int] = []
        self.stop_reason: str | None = None

    def _reset(self) -> None:
        """An empty cache (after a failed device call that may have consumed the old one)."""
        self.cache = KVCache.init(self.config, 1, self.capacity)
        self.tokens = []

    def render(self, messages: Sequence[Message]) -> list[int]:
        text = render_chat(
            self.template,
            messages,
            add_generation_prompt=True,
            bos_token=getattr(self.tokenizer, "bos_token", None),
            eos_token=getattr(self.tokenizer, "eos_token", None),
            **self.template_kwargs,
        )
        # The template writes its own special tokens (BOS included), as transformers'
        # apply_chat_template tokenizes: no tokenizer-added specials.
        try:
            return self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # a tokenizer without the option
            return self.tokenizer.encode(text)

    def _prefill(self, ids: list[int]) -> jax.Array:
        """Bring the cache to hold exactly `ids`; returns the logits of the last one."""
        if len(ids) > self.capacity:
            raise ValueError(
                f"the conversation is {len(ids)} tokens, over the cache capacity {self.capacity}"
            )
        keep = _common_prefix(self.tokens, ids)
        keep = min(keep, len(ids) - 1)  # the last token is always run, for its logits
        if keep < len(self.tokens):
            self.cache = self.cache.truncate(keep)
            self.tokens = self.tokens[:keep]
        new = ids[keep:]
        try:
            logits, self.cache = extend(
                self.params,
                self.config,
                self.cache,
                [new],
                logits="last",
                prefill_chunk=self.prefill_chunk,
            )
        except Exception:
            self._reset()  # the cache may have been donated to the failed call
            raise
        self.tokens = list(ids)
        self.prefilled.append(len(new))
        return logits

    def reply(self, messages: Sequence[Message], max_new_tokens: int = 256) -> Iterator[list[int]]:
        """Yield the reply's token ids in chunks; the end-of-turn token is not yielded.

        The cache then holds the history and the reply except its last token (sampled, not yet
        run); the next turn's render brings that token in with the rest."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.stop_reason = None
        logits = self._prefill(self.render(messages))
        eos = jnp.asarray(self.stop_ids, jnp.int32)
        self.key, sub = _split(self.key, self.sampling)
        first = sample(logits, sub, self.sampling)
        pending = int(first[0])
        if pending in self.stop_ids:
            self.stop_reason = "end_of_turn"
            return
        state = DecodeState(cache=self.cache, tokens=first, done=jnp.isin(first, eos), key=self.key)
        self.stop_reason = "max_new_tokens"
        yield [pending]
        emitted = 1
        while emitted < max_new_tokens:
            room = self.capacity - int(state.cache.index)
            if room < 1:
                self.stop_reason = "capacity"
                break
            n = min(self.chunk_size, room, max_new_tokens - emitted)
            try:
                span = attention_span(int(state.cache.index) + self.chunk_size, self.capacity, True)
                loop = Loop(
                    config=self.config,
                    sampling=self.sampling,
                    steps=((self.chunk_size, span),),
                )
                state, toks, ok, _ = resume_jit(
                    self.params, state, eos, jnp.int32(0), jnp.int32(n), loop=loop
                )
            except Exception:
                self._reset()  # the state was donated to the failed call
                raise
            # The old state was donated: the conversation holds the new one at once.
            self.cache, self.key = state.cache, state.key
            got = [int(t) for t, k in zip(np.asarray(toks[0]), np.asarray(ok[0]), strict=True) if k]
            if not got:  # no room for the pending token
                self.stop_reason = "capacity"
                break
            # Each step ran the pending token into the cache and sampled the next one.
            self.tokens += [pending, *got[:-1]]
            pending = got[-1]
            visible = [t for t in got if t not in self.stop_ids]  # a stop ends the row
            if visible:
                yield visible
                emitted += len(visible)
            if pending in self.stop_ids:
                self.stop_reason = "end_of_turn"
                break

    def reply_text(
        self,
        messages: Sequence[Message],
        max_new_tokens: int = 256,
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[str, list[int]]:
        """Run `reply` to the end; returns (text, token ids), streaming text to `on_text`."""
        from jaxkv.tokenizer import StreamDecoder

        dec = StreamDecoder(self.tokenizer)
        ids: list[int] = []
        for chunk in self.reply(messages, max_new_tokens):
            ids.extend(chunk)
            text = dec.push(chunk)
            if on_text and text:
                on_text(text)
        return dec.text, ids
