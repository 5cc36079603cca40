"""jaxkv: fast autoregressive decoding in JAX/Flax around an explicit, immutable KV cache."""

from jaxkv.cache import (
    Dense,
    Heavy,
    KVCache,
    KVQuant,
    LayerKV,
    SnapKV,
    Window,
    WritePlan,
    cache_memory_bytes,
)
from jaxkv.checkpoint import load_pretrained, save_pretrained
from jaxkv.config import PRESETS, ModelConfig, preset
from jaxkv.decode import (
    DecodeState,
    GenerationResult,
    decode_step,
    generate,
    generate_stream,
    prefill,
    resume,
)
from jaxkv.model import Transformer, cast_params, forward, init_params
from jaxkv.prefill import PREFILL_CHUNK, bucket_length, extend
from jaxkv.sampling import GREEDY, SamplingConfig, sample
from jaxkv.sharding import make_mesh, shard_params
from jaxkv.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GREEDY",
    "PREFILL_CHUNK",
    "PRESETS",
    "ByteTokenizer",
    "DecodeState",
    "Dense",
    "GenerationResult",
    "Heavy",
    "KVCache",
    "KVQuant",
    "LayerKV",
    "ModelConfig",
    "SamplingConfig",
    "SnapKV",
    "Tokenizer",
    "Transformer",
    "Window",
    "WritePlan",
    "bucket_length",
    "cache_memory_bytes",
    "cast_params",
    "decode_step",
    "extend",
    "forward",
    "generate",
    "generate_stream",
    "init_params",
    "load_pretrained",
    "load_tokenizer",
    "make_mesh",
    "prefill",
    "preset",
    "resume",
    "sample",
    "save_pretrained",
    "shard_params",
]
