"""GemmaConfig: the validated, frozen description of a Gemma 1, 2 or 3 text decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("gemma", "gemma2", "gemma3")
ATTENTION_TYPES = ("global", "local")
# Named patterns, repeated over the layers: Gemma 2 alternates local/global, Gemma 3 has five
# local layers for each global one.
PATTERNS = {
    "global": ("global",),
    "alternating": ("local", "global"),
    "local_global_5_1": ("local",) * 5 + ("global",),
}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture and numerics of a Gemma decoder.

    Attributes:
      vocab_size: V, the number of token embeddings.
      embed_dim: D, the width of the residual stream.
      num_layers: the number of transformer blocks.
      num_heads: N, the query heads.
      num_kv_heads: K, the key/value heads (1: multi-query; N: multi-head; else grouped).
      head_dim: H, the width of one head (need not be D / N).
      mlp_dim: F, the hidden width of the GeGLU MLP.
      family: "gemma", "gemma2" or "gemma3": the Hugging Face architecture for export.
      attention_pattern: a name in `PATTERNS` (repeated over the layers) or one
        "global"/"local" entry per layer.
      sliding_window: how many tokens (the query's own included) a local layer attends to.
      query_pre_attn_scalar: queries are scaled by its inverse square root (None: head_dim).
      attn_logit_softcap: `cap * tanh(logits / cap)` on attention logits (None: off).
      final_logit_softcap: the same on the output logits (None: off).
      use_post_attn_norm: Gemma 2/3's RMSNorm on the attention output.
      use_post_ffw_norm: Gemma 2/3's RMSNorm on the MLP output.
      use_qk_norm: Gemma 3's RMSNorm on queries and keys (per head).
      rope_base: the RoPE base of global layers.
      rope_local_base: the RoPE base of local layers (None: rope_base).
      rope_scale_factor: linear RoPE scaling of global layers (positions / factor).
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype ("float32" in tests, "bfloat16" on TPU).
      param_dtype: parameter dtype.
      pad_id, eos_id, bos_id: Gemma's special tokens.
      scan_layers: run the blocks under one `lax.scan` over params stacked along a leading
        layer axis (`params["layers"]`, see `gemma.stack_layers`), as MaxText and Tunix do on
        TPU: compile time and program size stop growing with depth. Same logits; another
        params layout (Hugging Face import and export follow it).
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    family: str = "gemma"
    attention_pattern: str | tuple[str, ...] = "global"
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    use_post_attn_norm: bool = False
    use_post_ffw_norm: bool = False
    use_qk_norm: bool = False
    rope_base: float = 10_000.0
    rope_local_base: float | None = None
    rope_scale_factor: float = 1.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    scan_layers: bool = False

    def __post_init__(self):
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"GemmaConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GemmaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GemmaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.family not in FAMILIES:
            raise ValueError(f"GemmaConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if isinstance(self.attention_pattern, str):
            if self.attention_pattern not in PATTERNS:
                raise ValueError(
                    f"GemmaConfig.attention_pattern: unknown pattern {self.attention_pattern!r}; "
                    f"use one of {sorted(PATTERNS)} or a tuple of 'global'/'local' per layer"
                )
        else:
            pattern = tuple(self.attention_pattern)
            bad = [t for t in pattern if t not in ATTENTION_TYPES]
            if bad or len(pattern) != self.num_layers:
                raise ValueError(
                    f"GemmaConfig.attention_pattern must name one of {ATTENTION_TYPES} for each "
                    f"of the {self.num_layers} layers, got {self.attention_pattern!r}"
                )
            object.__setattr__(self, "attention_pattern", pattern)
        if "local" in self.attention_types and (
            self.sliding_window is None or self.sliding_window <= 0
        ):
            raise ValueError(
                "GemmaConfig.sliding_window must be a positive int when some layers are local, "
                f"got {self.sliding_window!r}"
            )
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                     "rope_local_base"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"GemmaConfig.{name} must be positive or None, got {value!r}")
        for name in ("rope_base", "rope_scale_factor", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GemmaConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(
                    f"GemmaConfig.{name}: unknown dtype {getattr(self, name)!r}"
                ) from None

    @property
    def attention_types(self) -> tuple[str, ...]:
        """'global' or 'local' for each layer."""
        if isinstance(self.attention_pattern, tuple):
            return self.attention_pattern
        cycle = PATTERNS[self.attention_pattern]
        return tuple(cycle[i % len(cycle)] for i in range(self.num_layers))

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes: Any) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GemmaConfig:
        """A named size (`PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown Gemma preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_GEMMA2 = dict(family="gemma2", attention_pattern="alternating", use_post_attn_norm=True,
               use_post_ffw_norm=True, attn_logit_softcap=50.0, final_logit_softcap=30.0)
_GEMMA3 = dict(family="gemma3", attention_pattern="local_global_5_1", use_post_attn_norm=True,
               use_post_ffw_norm=True, use_qk_norm=True, rope_base=1_000_000.0,
               rope_local_base=10_000.0)

PRESETS: dict[str, dict[str, Any]] = {
    "gemma_2b": dict(vocab_size=256_000, embed_dim=2048, num_layers=18, num_heads=8,
                     num_kv_heads=1, head_dim=256, mlp_dim=16_384),
    "gemma_7b": dict(vocab_size=256_000, embed_dim=3072, num_layers=28, num_heads=16,
                     num_kv_heads=16, head_dim=256, mlp_dim=24_576),
    "gemma2_2b": dict(vocab_size=256_000, embed_dim=2304, num_layers=26, num_heads=8,
                      num_kv_heads=4, head_dim=256, mlp_dim=9216, sliding_window=4096,
                      query_pre_attn_scalar=256, **_GEMMA2),
    "gemma2_9b": dict(vocab_size=256_000, embed_dim=3584, num_layers=42, num_heads=16,
                      num_kv_heads=8, head_dim=256, mlp_dim=14_336, sliding_window=4096,
                      query_pre_attn_scalar=256, **_GEMMA2),
    "gemma2_27b": dict(vocab_size=256_000, embed_dim=4608, num_layers=46, num_heads=32,
                       num_kv_heads=16, head_dim=128, mlp_dim=36_864, sliding_window=4096,
                       query_pre_attn_scalar=144, **_GEMMA2),
    "gemma3_1b": dict(vocab_size=262_144, embed_dim=1152, num_layers=26, num_heads=4,
                      num_kv_heads=1, head_dim=256, mlp_dim=6912, sliding_window=512,
                      query_pre_attn_scalar=256, **_GEMMA3),
    "gemma3_4b": dict(vocab_size=262_208, embed_dim=2560, num_layers=34, num_heads=8,
                      num_kv_heads=4, head_dim=256, mlp_dim=10_240, sliding_window=1024,
                      query_pre_attn_scalar=256, rope_scale_factor=8.0, **_GEMMA3),
    "gemma3_12b": dict(vocab_size=262_208, embed_dim=3840, num_layers=48, num_heads=16,
                       num_kv_heads=8, head_dim=256, mlp_dim=15_360, sliding_window=1024,
                       query_pre_attn_scalar=256, rope_scale_factor=8.0, **_GEMMA3),
    "gemma3_27b": dict(vocab_size=262_208, embed_dim=5376, num_layers=62, num_heads=32,
                       num_kv_heads=16, head_dim=128, mlp_dim=21_504, sliding_window=1024,
                       query_pre_attn_scalar=168, rope_scale_factor=8.0, **_GEMMA3),
    # Test sizes: every feature at a few thousand parameters.
    "tiny": dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128),
    "tiny_gemma2": dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=24, mlp_dim=128, sliding_window=4, query_pre_attn_scalar=24,
                        **_GEMMA2),
    "tiny_gemma3": dict(vocab_size=256, embed_dim=64, num_layers=6, num_heads=4, num_kv_heads=1,
                        head_dim=32, mlp_dim=128, sliding_window=4, query_pre_attn_scalar=32,
                        **{**_GEMMA3, "rope_scale_factor": 8.0}),
}
