"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` tokenizer.

llama.cpp stores a byte-level BPE vocabulary as metadata: `tokenizer.ggml.tokens` (spelled in
GPT-2's byte alphabet), `.merges`, `.token_type` (control and user-defined tokens), `.pre` (the
pre-tokenizer's name), the special token ids and `tokenizer.chat_template`. This module turns
them into a `tokenizers.Tokenizer` with the matching pre-tokenizer, decoder and post-processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxkv.checkpoint import CheckpointError

SUPPORTED_TOKENIZERS = ("gpt2",)

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
