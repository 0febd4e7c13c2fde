"""Gemma 1, 2, 3 and 4 text decoders in Flax, with Hugging Face import/export."""

from warp_jax.gemma.config import PRESETS, GemmaConfig
from warp_jax.gemma.model import Gemma, abstract_params, init_cache, left_padded_positions
from warp_jax.gemma.scanned import stack_layers, unstack_layers

__all__ = ["PRESETS", "Gemma", "GemmaConfig", "abstract_params", "init_cache",
           "left_padded_positions", "stack_layers", "unstack_layers"]
