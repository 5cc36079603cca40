"""Tokenizers: the byte-level tokenizer, Hugging Face tokenizer.json loading, streaming decode."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxkv.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, Tokenizer, load_tokenizer


@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials_and_protocol(tmp_path):
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode("hé") == [257, 104, 195, 169]
    assert tok.decode([257, 104, 256, 105, 258]) == "hi"
    assert tok.eos_ids == (258,) and tok.pad_id == 256 and tok.vocab_size == 259
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.encode("x") == tok.encode("x")


def test_stream_decoder_never_splits_a_character():
    tok = ByteTokenizer(add_bos=False)
    ids = tok.encode("añ€😀!")
    dec = StreamDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    assert "".join(pieces) == "añ€😀!"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "ñ"  # ñ is two bytes: nothing after the first


@pytest.fixture
def hf_dir(tmp_path):
    from tokenizers import Tokenizer as HfTok
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5, "!": 6}
    tok = HfTok(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_hf_tokenizer_with_ids_from_config(hf_dir):
    (hf_dir / "config.json").write_text(json.dumps({"eos_token_id": [2, 6], "pad_token_id": 3}))
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.encode("hello world !") == [4, 5, 6]
    assert tok.decode([1, 4, 5, 2]) == "hello world"  # special tokens skipped
    assert tok.eos_ids == (2, 6) and tok.pad_id == 3 and tok.vocab_size == 7


def test_hf_tokenizer_ids_from_tokenizer_config(hf_dir):
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": {"content": "<pad>"}})
    )
    tok = load_tokenizer(hf_dir)
    assert tok.eos_ids == (2,) and tok.pad_id == 3


def test_no_tokenizer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json or byte_tokenizer.json"):
        load_tokenizer(tmp_path)
