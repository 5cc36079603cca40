"""The bundled model's quality, against the numbers recorded when it was trained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

import jaxkv
from jaxkv.checkpoint import load_pretrained
from jaxkv.cli import BUNDLED_MODEL
from jaxkv.sampling import SamplingConfig
from jaxkv.tokenizer import load_tokenizer
from jaxkv.train import TINY_CONFIG, bits_per_byte_of_text

SAMPLE = Path(__file__).parent / "fixtures" / "heldout_sample.txt"


def _load():
    config, params = load_pretrained(BUNDLED_MODEL)
    return config, params, json.loads((BUNDLED_MODEL / "training.json").read_text())


def test_heldout_bits_per_byte_matches_the_recorded_number():
    config, params, record = _load()
    assert config == TINY_CONFIG
    bpb = bits_per_byte_of_text(params, config, SAMPLE.read_bytes())
    assert abs(bpb - record["sample_bits_per_byte"]) < 0.01, (bpb, record)
    assert bpb < record["unigram_bits_per_byte"] - 1.5  # far better than byte frequencies
    assert record["heldout_bits_per_byte"] <= 2.2


def _python_like(text: str) -> tuple[bool, bool, float]:
    """(has an indented line, has two Python keywords, fraction of complete lines whose
    brackets balance)."""
    lines = text.splitlines()[:-1]  # the last line may be cut off mid-way
    indented = any(line.startswith("    ") and line.strip() for line in lines)
    keywords = re.findall(
        r"\b(def|return|if|elif|else|for|in|import|class|self|None|not|"
        r"raise|try|except|with|while|pass|is)\b",
        text,
    )
    balanced = [
        line.count("(") == line.count(")") and line.count("[") == line.count("]") for line in lines
    ]
    return indented, len(keywords) >= 2, sum(balanced) / max(1, len(balanced))


def test_sampled_completions_look_like_python():
    config, params, _ = _load()
    tok = load_tokenizer(BUNDLED_MODEL)
    prompt = "def fibonacci(n):"
    res = jaxkv.generate(
        params,
        config,
        [tok.encode(prompt)] * 4,
        max_new_tokens=200,
        sampling=SamplingConfig(temperature=0.8, top_p=0.95),
        key=0,
        eos_ids=tok.eos_ids,
        pad_id=tok.pad_id,
    )
    fractions = []
    for row in range(4):
        text = tok.decode(np.asarray(res.tokens[row, : int(res.lengths[row])]))
        indented, keywords, balanced = _python_like(text)
        assert indented and keywords, text
        fractions.append(balanced)
    assert np.mean(fractions) >= 0.7, fractions
