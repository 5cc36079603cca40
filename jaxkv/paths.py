"""Where jaxkv keeps files on disk: its cache directory (the real model fetched at set-up, the
persistent XLA compilation cache)."""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_COMMAND = "bash scripts/fetch_real_model.sh"


def cache_dir() -> Path:
    """$JAXKV_CACHE_DIR, else ~/.cache/jaxkv."""
    env = os.environ.get("JAXKV_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "jaxkv"


def smollm2_path() -> Path:
    """Where the set-up step puts SmolLM2-135M-Instruct (it may not be there)."""
    return cache_dir() / SMOLLM2_FILE


def compile_cache_dir() -> Path:
    return cache_dir() / "xla"
