"""Tokenizers: one small protocol, a byte-level tokenizer that needs no files, and Hugging Face
`tokenizer.json` files through the `tokenizers` package."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What generation and the CLI need from a tokenizer."""

    vocab_size: int
    eos_ids: tuple[int, ...]
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class StreamDecoder:
    """Turns a growing list of token ids into text increments, never splitting a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        new, self.text = text[len(self.text) :], text
        return new


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then <pad>=256, <bos>=257, <eos>=258.

    `encode` prepends <bos>. `decode` drops special ids and decodes the bytes as UTF-8,
    replacing invalid sequences.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos
        self.eos_ids = (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return codecs.decode(data, "utf-8", errors="replace")

    def save(self, path: str | os.PathLike[str]) -> None:
        spec = {
            "type": "byte",
            "add_bos": self.add_bos,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }
        (Path(path) / BYTE_TOKENIZER_FILE).write_text(json.dumps(spec, indent=2))


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, with EOS and pad ids from the checkpoint's configs."""

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: Sequence[int],
        pad_id: int | None,
        vocab_size: int,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id if pad_id is not None else (self.eos_ids or (0,))[0])
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """The tokenizer a GGUF file's metadata describes."""
        from jaxkv.gguf_checkpoint import read_gguf

        spec = read_gguf(path).tokenizer()
        tok = spec.tokenizer
        eos = spec.stop_ids
        return cls(
            tok,
            eos,
            spec.pad_id,
            tok.get_vocab_size(with_added_tokens=True),
            chat_template=spec.chat_template,
            bos_token=spec.token(spec.bos_id),
            eos_token=spec.token(spec.eos_id),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        try:
            tok = _Tok.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"cannot read {path / 'tokenizer.json'}: {e}") from e
        configs = [
            json.loads((path / n).read_text())
            for n in ("generation_config.json", "config.json", "tokenizer_config.json")
            if (path / n).is_file()
        ]

        def ids(key: str, token_key: str) -> list[int]:
            for cfg in configs:
                value = cfg.get(key)
                if value is not None:
                    return value if isinstance(value, list) else [value]
            for cfg in configs:  # tokenizer_config.json names tokens, not ids
                token = cfg.get(token_key)
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str) and tok.token_to_id(token) is not None:
                    return [tok.token_to_id(token)]
            return []

        eos = ids("eos_token_id", "eos_token")
        pad = (ids("pad_token_id", "pad_token") or [None])[0]
        tc_file = path / "tokenizer_config.json"
        tok_config = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
        template = tok_config.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # transformers 5 keeps it beside
            template = (path / "chat_template.jinja").read_text()

        def name(key: str) -> str | None:
            token = tok_config.get(key)
            return token.get("content") if isinstance(token, dict) else token

        return cls(
            tok,
            sorted(set(eos)),
            pad,
            tok.get_vocab_size(with_added_tokens=True),
            chat_template=template if isinstance(template, str) else None,
            bos_token=name("bos_token"),
            eos_token=name("eos_token"),
        )

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special added tokens (`<end_of_turn>`, `<|im_end|>` ...)."""
        decoder = self._tok.get_added_tokens_decoder()
        return frozenset(int(i) for i, t in decoder.items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens=False leaves out what the tokenizer's
        post-processor adds (a BOS), as for text a chat template rendered."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer stored in a model directory: `tokenizer.json` (Hugging Face) or
    `byte_tokenizer.json` (jaxkv's byte-level tokenizer); or the one a GGUF file describes."""
    path = Path(path)
    if path.is_file():
        return HFTokenizer.from_gguf(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(path)
    spec_file = path / BYTE_TOKENIZER_FILE
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text())
        if spec.get("type") != "byte":
            raise ValueError(f"{spec_file}: unknown tokenizer type {spec.get('type')!r}")
        return ByteTokenizer(add_bos=bool(spec.get("add_bos", True)))
    raise ValueError(f"{path} has no tokenizer.json or {BYTE_TOKENIZER_FILE}")
