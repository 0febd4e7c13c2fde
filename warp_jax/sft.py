"""Supervised next-token training of a Gemma: the SFT policy of the self-contained demo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from warp_jax.gemma import Gemma, GemmaConfig, left_padded_positions
from warp_jax.gemma.tokenizer import Tokenizer
from warp_jax.losses import next_token_loss


def lm_loss(cfg: GemmaConfig, params: Any, tokens_BT: jax.Array, mask_BT: jax.Array):
    """Mean next-token cross-entropy over the real tokens of left-padded sequences."""
    logits, _ = Gemma(cfg).apply({"params": params}, tokens_BT, left_padded_positions(mask_BT),
                                 mask_BT)
    return next_token_loss(logits, tokens_BT, mask_BT)


def train_lm(cfg: GemmaConfig, params: Any, tokenizer: Tokenizer, texts: Sequence[str], *,
             steps: int, batch_size: int, max_len: int, learning_rate: float,
             seed: int | Sequence[int] = 0,
             progress: bool = True) -> tuple[Any, float]:
    """Trains `params` on `texts` (each ending with EOS) with Adam; returns them and the
    final loss. Batches are drawn with a generator seeded by `seed`, so reruns agree."""
    tokens, mask = tokenizer.encode_batch(list(texts), max_len, add_eos=True)
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 20), steps, learning_rate / 10))

    @jax.jit
    def step(params, opt_state, batch_tokens, batch_mask):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(cfg, p, batch_tokens, batch_mask))(
            params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    opt_state = optimizer.init(params)
    loss = jnp.nan
    for _ in tqdm(range(steps), desc="SFT", unit="step", disable=not progress):
        rows = rng.choice(len(tokens), size=batch_size, replace=False)
        params, opt_state, loss = step(params, opt_state, tokens[rows], mask[rows])
    return params, float(loss)
