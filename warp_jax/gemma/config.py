"""GemmaConfig: the validated, frozen description of a Gemma 1, 2, 3 or 4 text decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("gemma", "gemma2", "gemma3", "gemma4")
ATTENTION_TYPES = ("global", "local")
# Named patterns, repeated over the layers: Gemma 2 alternates local/global, Gemma 3 and most
# Gemma 4 models have five local layers for each global one, Gemma 4 E2B four.
PATTERNS = {
    "global": ("global",),
    "alternating": ("local", "global"),
    "local_global_5_1": ("local",) * 5 + ("global",),
    "local_global_4_1": ("local",) * 4 + ("global",),
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
      family: "gemma", "gemma2", "gemma3" or "gemma4": the Hugging Face architecture for
        export. "gemma4" also means Gemma 4's numerics: RMSNorm scales that multiply (not
        `1 + scale`), a scale-free RMSNorm on values, unscaled queries (their RMSNorm sets
        the scale) and a learned scalar on each block's output.
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
      global_head_dim: H of the global layers (None: head_dim), Gemma 4's wider global heads.
      num_global_kv_heads: K of the global layers (None: num_kv_heads).
      attention_k_eq_v: global layers have no value projection: values are the keys'
        projection (before the key norm and RoPE), under the value norm.
      num_kv_shared_layers: the last this many layers compute no keys or values: each reuses
        those (cache included) of the last earlier layer of its attention type.
      double_wide_mlp: the KV-shared layers' MLPs are 2 * mlp_dim wide.
      per_layer_input_dim: P, the width of Gemma 4's per-layer inputs (0: off): a `[V, L, P]`
        token embedding plus a projection of the embedded tokens feed each block a gated
        residual of its own.
      per_layer_vocab_size: the rows of that embedding (None: vocab_size).
      rope_global_fraction: the share of a global head's dimensions that RoPE rotates
        (transformers' "proportional" RoPE; frequencies as for the whole head, the rest
        unrotated).
      num_experts: E, the experts of Gemma 4's mixture-of-experts branch beside each block's
        MLP (0: no such branch).
      experts_per_token: how many experts each token is routed to.
      expert_mlp_dim: the hidden width of one expert's GeGLU.
      scan_layers: run the blocks under one `lax.scan` over params stacked along a leading
        layer axis (`params["layers"]`, see `gemma.stack_layers`), as MaxText and Tunix do on
        TPU: compile time and program size stop growing with depth. Same logits; another
        params layout (Hugging Face import and export follow it). Gemma 4 scans one period of
        its attention pattern a step (`scan_period`, `scan_depth`).
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
    global_head_dim: int | None = None
    num_global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    per_layer_input_dim: int = 0
    per_layer_vocab_size: int | None = None
    rope_global_fraction: float = 1.0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_mlp_dim: int = 0
    scan_layers: bool = False

    def __post_init__(self):
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"GemmaConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        self._check_ints(("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                          "head_dim", "mlp_dim"), low=1)
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
        self._check_gemma4_fields()
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(
                    f"GemmaConfig.{name}: unknown dtype {getattr(self, name)!r}"
                ) from None

    def _check_ints(self, names: tuple[str, ...], low: int, optional: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "a positive int" if low == 1 else f"an int >= {low}"
                raise ValueError(f"GemmaConfig.{name} must be {kind}"
                                 f"{' or None' if optional else ''}, got {value!r}")

    def _check_gemma4_fields(self) -> None:
        self._check_ints(("global_head_dim", "num_global_kv_heads", "per_layer_vocab_size"),
                         low=1, optional=True)
        self._check_ints(("num_kv_shared_layers", "per_layer_input_dim", "num_experts",
                          "experts_per_token", "expert_mlp_dim"), low=0)
        if not 0 < self.rope_global_fraction <= 1:
            raise ValueError("GemmaConfig.rope_global_fraction must be in (0, 1], got "
                             f"{self.rope_global_fraction!r}")
        if self.family != "gemma4":
            used = [name for name, default in _GEMMA4_DEFAULTS.items()
                    if getattr(self, name) != default]
            if used:
                raise ValueError(f"GemmaConfig.{used[0]} is a Gemma 4 feature: set "
                                 f"family='gemma4' to use it")
            return
        if self.global_head_dim is not None and self.global_head_dim % 2:
            raise ValueError("GemmaConfig.global_head_dim must be even for RoPE, got "
                             f"{self.global_head_dim}")
        if self.num_heads % self.kv_heads_of("global"):
            raise ValueError(f"GemmaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_global_kv_heads ({self.num_global_kv_heads})")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts
                                     and self.expert_mlp_dim > 0):
            raise ValueError(
                f"GemmaConfig: {self.num_experts} experts need 1 <= experts_per_token <= "
                f"num_experts and expert_mlp_dim > 0, got experts_per_token="
                f"{self.experts_per_token}, expert_mlp_dim={self.expert_mlp_dim}")
        if self.num_kv_shared_layers > self.num_layers:
            raise ValueError(f"GemmaConfig.num_kv_shared_layers ({self.num_kv_shared_layers}) "
                             f"exceeds num_layers ({self.num_layers})")
        _ = self.kv_sources  # raises for a shared layer with no producer
        if self.scan_layers and not self.scan_depth:
            raise ValueError(
                f"GemmaConfig.scan_layers: no whole period of {self.scan_period} layers comes "
                f"before layer {min(s for s in self.kv_sources if s is not None)}, whose keys "
                "and values later layers share, so nothing would be scanned; set it False")

    def head_dim_of(self, attention_type: str) -> int:
        """H of a layer of this attention type ("global" or "local")."""
        if attention_type == "global" and self.global_head_dim is not None:
            return self.global_head_dim
        return self.head_dim

    def kv_heads_of(self, attention_type: str) -> int:
        """K of a layer of this attention type."""
        if attention_type == "global" and self.num_global_kv_heads is not None:
            return self.num_global_kv_heads
        return self.num_kv_heads

    def values_are_keys(self, attention_type: str) -> bool:
        """Whether layers of this type take their values from the key projection."""
        return self.attention_k_eq_v and attention_type == "global"

    @property
    def kv_sources(self) -> tuple[int | None, ...]:
        """For each layer, None if it computes its keys and values, else the index of the
        earlier layer whose keys and values (and cache) it reuses (`num_kv_shared_layers`)."""
        first = self.num_layers - self.num_kv_shared_layers
        types = self.attention_types
        sources: list[int | None] = [None] * first
        for i in range(first, self.num_layers):
            producers = [j for j in range(first) if types[j] == types[i]]
            if not producers:
                raise ValueError(
                    f"GemmaConfig: layer {i} shares keys and values (num_kv_shared_layers="
                    f"{self.num_kv_shared_layers}) but no earlier layer is {types[i]}")
            sources.append(producers[-1])
        return tuple(sources)

    def mlp_dim_of(self, layer: int) -> int:
        """F of a layer: doubled on KV-shared layers with `double_wide_mlp`."""
        shared = self.double_wide_mlp and layer >= self.num_layers - self.num_kv_shared_layers
        return self.mlp_dim * (2 if shared else 1)

    @property
    def attention_types(self) -> tuple[str, ...]:
        """'global' or 'local' for each layer."""
        if isinstance(self.attention_pattern, tuple):
            return self.attention_pattern
        cycle = PATTERNS[self.attention_pattern]
        return tuple(cycle[i % len(cycle)] for i in range(self.num_layers))

    @property
    def scan_period(self) -> int | None:
        """Layers per step of the scan over layers: None for Gemma 1-3 (one layer a step, a
        traced flag picking its attention type: the types share their shapes), or for Gemma 4,
        whose global and local layers differ in shape, one period of its attention pattern
        (5 local + 1 global: 6), the layers after the last whole period unrolled."""
        if self.family != "gemma4":
            return None
        types = self.attention_types
        return next(p for p in range(1, len(types) + 1)
                    if all(t == types[i % p] for i, t in enumerate(types)) or p == len(types))

    @property
    def scan_depth(self) -> int:
        """How many of the first layers run under the scan (`scan_layers`): all of them for
        Gemma 1-3; for Gemma 4 the whole periods before the first layer whose keys and values
        later layers share (E2B: 10 of 35, E4B: 18 of 42; those layers and the KV-shared ones
        after them run unrolled)."""
        if self.scan_period is None:
            return self.num_layers
        donors = [s for s in self.kv_sources if s is not None]
        return min(donors, default=self.num_layers) // self.scan_period * self.scan_period

    @property
    def query_scale(self) -> float:
        if self.family == "gemma4":  # its query norm sets the scale
            return 1.0
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
_GEMMA4 = dict(family="gemma4", attention_pattern="local_global_5_1", use_post_attn_norm=True,
               use_post_ffw_norm=True, use_qk_norm=True, rope_base=1_000_000.0,
               rope_local_base=10_000.0, rope_global_fraction=0.25, final_logit_softcap=30.0,
               global_head_dim=512)
# The Gemma 4 fields and their off values: other families must leave them so.
_GEMMA4_DEFAULTS = dict(global_head_dim=None, num_global_kv_heads=None, attention_k_eq_v=False,
                        num_kv_shared_layers=0, double_wide_mlp=False, per_layer_input_dim=0,
                        per_layer_vocab_size=None, rope_global_fraction=1.0, num_experts=0,
                        experts_per_token=0, expert_mlp_dim=0)

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
    "gemma4_e2b": dict(vocab_size=262_144, embed_dim=1536, num_layers=35, num_heads=8,
                       num_kv_heads=1, head_dim=256, mlp_dim=6144, sliding_window=512,
                       per_layer_input_dim=256, num_kv_shared_layers=20, double_wide_mlp=True,
                       **{**_GEMMA4, "attention_pattern": "local_global_4_1"}),
    "gemma4_e4b": dict(vocab_size=262_144, embed_dim=2560, num_layers=42, num_heads=8,
                       num_kv_heads=2, head_dim=256, mlp_dim=10_240, sliding_window=512,
                       per_layer_input_dim=256, num_kv_shared_layers=18, **_GEMMA4),
    "gemma4_12b": dict(vocab_size=262_144, embed_dim=3840, num_layers=48, num_heads=16,
                       num_kv_heads=8, head_dim=256, mlp_dim=15_360, sliding_window=1024,
                       num_global_kv_heads=1, attention_k_eq_v=True, **_GEMMA4),
    "gemma4_26b_a4b": dict(vocab_size=262_144, embed_dim=2816, num_layers=30, num_heads=16,
                           num_kv_heads=8, head_dim=256, mlp_dim=2112, sliding_window=1024,
                           num_global_kv_heads=2, attention_k_eq_v=True, num_experts=128,
                           experts_per_token=8, expert_mlp_dim=704, **_GEMMA4),
    "gemma4_31b": dict(vocab_size=262_144, embed_dim=5376, num_layers=60, num_heads=32,
                       num_kv_heads=16, head_dim=256, mlp_dim=21_504, sliding_window=1024,
                       num_global_kv_heads=4, attention_k_eq_v=True, **_GEMMA4),
    # Test sizes: every feature at a few thousand parameters.
    "tiny": dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128),
    "tiny_gemma2": dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=24, mlp_dim=128, sliding_window=4, query_pre_attn_scalar=24,
                        **_GEMMA2),
    "tiny_gemma3": dict(vocab_size=256, embed_dim=64, num_layers=6, num_heads=4, num_kv_heads=1,
                        head_dim=32, mlp_dim=128, sliding_window=4, query_pre_attn_scalar=32,
                        **{**_GEMMA3, "rope_scale_factor": 8.0}),
    # Per-layer inputs, KV-shared layers with double-wide MLPs, keys as values and wider
    # global heads with partial RoPE.
    "tiny_gemma4": dict(vocab_size=256, embed_dim=64, num_layers=6, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=128, sliding_window=4, per_layer_input_dim=8,
                        num_kv_shared_layers=3, double_wide_mlp=True, num_global_kv_heads=1,
                        attention_k_eq_v=True, **{**_GEMMA4, "attention_pattern": "alternating",
                                                  "global_head_dim": 32}),
    # The mixture-of-experts branch.
    "tiny_gemma4_moe": dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, mlp_dim=64, sliding_window=4,
                            num_experts=4, experts_per_token=2, expert_mlp_dim=32,
                            **{**_GEMMA4, "attention_pattern": "alternating",
                               "global_head_dim": 32}),
}
