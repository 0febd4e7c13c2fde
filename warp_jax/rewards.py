"""Rewards: the reward-function protocol, a Gemma reward model, Bradley–Terry, preference data.

A reward function is either jittable, `(prompt_tokens, prompt_mask, completion_tokens,
completion_mask) -> [B]` (e.g. `model_reward`), or a host callable with `host = True` (e.g.
`TextReward` on decoded text), which the train step calls outside jit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from warp_jax import sharding
from warp_jax.gemma.config import GemmaConfig
from warp_jax.gemma.model import decode, left_padded_positions
from warp_jax.gemma.tokenizer import Tokenizer
from warp_jax.losses import bradley_terry_loss
from warp_jax.sources import Preference, read_preferences  # noqa: F401 (the public names)


def abstract_params(cfg: GemmaConfig) -> Any:
    """`RewardModel(cfg)`'s params as boxed `jax.ShapeDtypeStruct`s (see
    `gemma.abstract_params`)."""
    return jax.eval_shape(RewardModel(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                          jnp.ones((1, 1), bool))["params"]


POOLINGS = ("last", "mean")


class RewardModel(nn.Module):
    """`apply({"params": p}, tokens, mask) -> [B]` scores.

    The params are Gemma's plus `score` `[D]`, the head applied to the final-normed hidden
    state at each row's last True of `mask` (`hf.params_from_hf` reads them from
    `GemmaForSequenceClassification`-style checkpoints with `num_labels=1`). Positions count
    from each row's first real token, so left padding does not change a score.
    `remat=True` rematerialises each block in the backward pass (see `Gemma`).
    `pooling="mean"` scores each real token's hidden state with the head and averages them
    instead (same params): a bag-of-tokens read-out, which a small model learns a
    bag-of-words preference with far better than through its last token.
    """

    cfg: GemmaConfig
    remat: bool = False
    pooling: str = "last"

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        if self.pooling not in POOLINGS:
            raise ValueError(f"reward model pooling {self.pooling!r}: use one of {POOLINGS}")
        mask_BT = mask_BT.astype(bool)
        hidden_BTD, _, _ = decode(self, tokens_BT, left_padded_positions(mask_BT), mask_BT, None)
        score = self.param("score", nn.with_logical_partitioning(
            nn.initializers.normal(self.cfg.embed_dim**-0.5), ("embed",)),
            (self.cfg.embed_dim,), jnp.dtype(self.cfg.param_dtype))
        if self.pooling == "mean":
            per_token_BT = jnp.einsum("BTD,D->BT", hidden_BTD.astype(jnp.float32),
                                      score.astype(jnp.float32))
            return (jnp.sum(jnp.where(mask_BT, per_token_BT, 0.0), axis=1)
                    / jnp.maximum(jnp.sum(mask_BT, axis=1), 1))
        t = mask_BT.shape[1]
        last_B = t - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
        last_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
        return jnp.einsum("BD,D->B", last_BD.astype(jnp.float32), score.astype(jnp.float32))


class TextReward:
    """A host reward on decoded text, for `reinforce.make_train_step` (called outside jit).

    `fn(prompts: list[str], completions: list[str]) -> [B]` scores a batch; prompt and
    completion tokens are decoded with `tokenizer` (the policy's), so `fn` may use its own.
    """

    host = True

    def __init__(self, fn: Callable[[list[str], list[str]], Any], tokenizer: Tokenizer):
        self.fn, self.tokenizer = fn, tokenizer

    def __call__(self, prompt_tokens, prompt_mask, completion_tokens, completion_mask):
        prompts = self.tokenizer.decode_batch(prompt_tokens, prompt_mask)
        completions = self.tokenizer.decode_batch(completion_tokens, completion_mask)
        scores = np.asarray(self.fn(prompts, completions), np.float32)
        if scores.shape != (len(prompts),):
            raise ValueError(f"the text reward returned shape {scores.shape}, expected "
                             f"({len(prompts)},): one score per completion")
        return scores


class TextClassifier:
    """A gold (oracle) reward on text: the probability that a human label is positive, from
    a TF-IDF (words and word pairs) logistic regression fitted on labelled texts.

    Trained on real labels (e.g. critics' fresh/rotten) of texts no reward model sees, it
    scores what a learned proxy only approximates, so a policy that games the proxy shows up
    as a gap between the two. `classifier(prompts, completions)` scores each prompt with its
    completion: the `TextReward` protocol.
    """

    def __init__(self, texts: list[str], labels, C: float = 4.0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        labels = np.asarray(labels, bool)
        if len(texts) != len(labels) or labels.all() or not labels.any():
            raise ValueError(f"a text classifier needs both labels among its {len(texts)} "
                             f"texts ({int(labels.sum())} positive, {len(labels)} labels)")
        self._model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(C=C, max_iter=1000))
        self._model.fit(list(texts), labels)

    def probability(self, texts: list[str]) -> np.ndarray:
        """P(positive label) of each text."""
        return self._model.predict_proba(list(texts))[:, 1]

    def accuracy(self, texts: list[str], labels) -> float:
        return float(np.mean((self.probability(texts) > 0.5) == np.asarray(labels, bool)))

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        return self.probability([f"{p} {c}" for p, c in zip(prompts, completions, strict=True)])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["cfg", "pooling"])
@dataclasses.dataclass(frozen=True)
class ModelReward:
    """A jittable reward: the `RewardModel` score of prompt + completion (with its
    `pooling`).

    A pytree whose leaves are the reward model's params, so that jitted code (the train
    step, the evaluation) takes them as arguments, in their sharding, rather than baking
    them into the program as constants, as it would a closure's arrays.
    """

    cfg: GemmaConfig
    params: Any
    pooling: str = "last"

    def __call__(self, prompt_tokens, prompt_mask, completion_tokens, completion_mask):
        tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
        mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
        return RewardModel(self.cfg, pooling=self.pooling).apply({"params": self.params},
                                                                 tokens, mask)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Standardized:
    """A jittable reward standardised: `(reward(...) - mean) / std`.

    With `mean` and `std` measured on the SFT policy's own completions (`standardize`), one
    unit of reward is one standard deviation of what the SFT policy scores, so the KL
    coefficient beta means the same whatever the reward model's scale: an unnormalised
    reward with a large spread drowns the KL penalty. A pytree of arrays, like `ModelReward`:
    the inner reward's (if it is such a pytree; else it is static), then `mean` and `std`.
    """

    reward: Any
    mean: Any
    std: Any

    def __call__(self, prompt_tokens, prompt_mask, completion_tokens, completion_mask):
        raw = self.reward(prompt_tokens, prompt_mask, completion_tokens, completion_mask)
        return (raw - self.mean) / self.std

    def tree_flatten(self):
        if reward_arrays(self.reward)[1] is not None:
            return (self.reward, self.mean, self.std), None
        return (self.mean, self.std), self.reward

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(*children) if static is None else cls(static, *children)


def standardize(reward_fn: Callable, scores) -> Standardized:
    """`reward_fn` shifted and scaled so that `scores` (its scores of reference completions,
    e.g. the SFT policy's) have mean 0 and standard deviation 1. Raises `ValueError` when
    they do not vary (or are not finite)."""
    scores = np.asarray(scores, np.float64)
    std = float(scores.std())
    if not (np.isfinite(scores).all() and std > 0):
        raise ValueError(f"cannot standardise a reward whose {scores.size} reference scores "
                         f"have standard deviation {std}")
    return Standardized(reward_fn, np.asarray(scores.mean(), np.float32),
                        np.asarray(std, np.float32))


def model_reward(cfg: GemmaConfig, params: Any, pooling: str = "last") -> ModelReward:
    """A jittable reward: the `RewardModel` score of prompt + completion (see `ModelReward`).

    The reward model must share the policy's tokenizer; otherwise wrap it in a `TextReward`.
    """
    return ModelReward(cfg, params, pooling)


def is_host_reward(reward_fn: Callable) -> bool:
    """Whether `reward_fn` runs on the host (`host = True`, e.g. `TextReward`): callers then
    pass it decoded NumPy arrays outside jit; otherwise it is jittable."""
    return bool(getattr(reward_fn, "host", False))


def reward_arrays(reward_fn: Callable) -> tuple[list, Any]:
    """`(leaves, treedef)` of a reward that is a pytree of arrays (`ModelReward`: its params),
    or `([], None)` for any other callable. Jitted code takes those arrays as arguments (see
    `call_reward`) instead of baking them in as constants."""
    leaves, treedef = jax.tree.flatten(reward_fn)
    if leaves and all(isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
                      for x in leaves):
        return leaves, treedef
    return [], None


def call_reward(reward_fn: Callable, treedef: Any, leaves: list, batch) -> jax.Array:
    """`reward_fn(*batch)`, rebuilt from the `leaves` passed in when `treedef` is given."""
    return (reward_fn if treedef is None else jax.tree.unflatten(treedef, leaves))(*batch)


@functools.partial(jax.jit, static_argnames=("fn", "treedef"))
def _jitted_reward(leaves, batch, *, fn, treedef):
    return call_reward(fn, treedef, leaves, batch)


def score(reward_fn: Callable, batch, host_batch=None) -> np.ndarray:
    """`reward_fn`'s `[B]` scores of `batch` (prompt tokens and mask, completion tokens and
    mask) as NumPy, in every process: a host reward on the host (on `host_batch`, `batch`
    already on the host, when the caller has it), a jittable one as one jitted program (its
    arrays passed in as arguments)."""
    if is_host_reward(reward_fn):
        host_batch = sharding.to_host(batch) if host_batch is None else host_batch
        return np.asarray(reward_fn(*host_batch), np.float32)
    leaves, treedef = reward_arrays(reward_fn)
    return sharding.to_host(_jitted_reward(leaves, batch, fn=reward_fn if treedef is None
                                           else None, treedef=treedef))


class RMState(NamedTuple):
    step: jax.Array  # [] int32
    params: Any  # RewardModel params
    opt_state: Any


def encode_pairs(tokenizer: Tokenizer, pairs: list[Preference], max_len: int):
    """Left-padded `(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask)`, `[B, T]`:
    each response follows its prompt, and over-long texts keep their last `max_len` tokens."""
    chosen = tokenizer.encode_batch([p.prompt + p.separator + p.chosen for p in pairs], max_len)
    rejected = tokenizer.encode_batch([p.prompt + p.separator + p.rejected for p in pairs],
                                      max_len)
    return (*chosen, *rejected)


def _bt_loss_and_accuracy(params, batch, cfg, remat=False, pooling="last"):
    chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, *target = batch
    model = RewardModel(cfg, remat, pooling)
    both = model.apply({"params": params}, jnp.concatenate([chosen_tokens, rejected_tokens]),
                       jnp.concatenate([chosen_mask, rejected_mask]))
    chosen, rejected = jnp.split(both, 2)
    return (bradley_terry_loss(chosen, rejected, *target),
            jnp.mean((chosen > rejected).astype(jnp.float32)))


def make_reward_train_step(cfg: GemmaConfig, optimizer: optax.GradientTransformation,
                           mesh: Mesh | None = None, remat: bool = False,
                           soft_labels: bool = False, pooling: str = "last"):
    """Bradley–Terry training of a `RewardModel`, jitted (sharded like the policy on `mesh`).

    Returns `(train_step, evaluate, init)`: `train_step(state, batch) -> (state, metrics)`,
    `evaluate(params, batch) -> metrics` (loss, accuracy) and `init(params) -> state`, where
    `batch` is `encode_pairs`' four arrays and, with `soft_labels`, a fifth: `[B]` the
    probability that each chosen response is preferred (`losses.bradley_terry_loss`). On a
    mesh, a training batch is split by rows over `data` x `fsdp`, so its size must be a
    multiple of theirs; `evaluate` takes the whole
    batch on every device, so any size works. `remat` rematerialises each block in the
    backward pass (see `Gemma`); `pooling` is the `RewardModel`'s.
    """

    def step(state: RMState, batch):
        (loss, accuracy), grads = jax.value_and_grad(_bt_loss_and_accuracy, has_aux=True)(
            state.params, batch, cfg, remat, pooling)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = RMState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        return new, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}

    def evaluate(params, batch):
        loss, accuracy = _bt_loss_and_accuracy(params, batch, cfg, pooling=pooling)
        return {"loss": loss, "accuracy": accuracy}

    def init(params):
        return RMState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    if mesh is None:
        return (jax.jit(step, donate_argnums=0), jax.jit(evaluate), jax.jit(init))
    boxed = abstract_params(cfg)
    state_sh = sharding.param_shardings(jax.eval_shape(init, boxed), mesh)
    params_sh = sharding.param_shardings(boxed, mesh)
    batch_sh = (sharding.batch_sharding(mesh, 2),) * 4 + (
        (sharding.batch_sharding(mesh, 1),) if soft_labels else ())
    out = sharding.replicated(mesh)
    return (jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, out),
                    donate_argnums=0),
            jax.jit(evaluate, in_shardings=(params_sh, (out,) * len(batch_sh)),
                    out_shardings=out),
            jax.jit(init, out_shardings=state_sh))


def fit(train_step: Callable, evaluate: Callable, state: RMState, train, held_out, *,
        steps: int, batch_size: int, seed: int, eval_every: int | None = None,
        on_eval: Callable[[RMState, dict[str, float]], None] | None = None,
        patience: int | None = None,
        progress: bool = True) -> tuple[RMState, dict[str, float]]:
    """Bradley–Terry training from `state.step` to `steps` (the functions of
    `make_reward_train_step`) on `train`, four (or five: soft labels) `encode_pairs`-style
    arrays; returns the state and its `held_out` metrics (loss, accuracy).

    Step t trains on `batch_size` rows drawn without replacement by
    `np.random.default_rng([seed, t])`, so a run resumed from a checkpointed state draws what
    an uninterrupted one would. Every `eval_every` steps and at the end, `on_eval(state,
    held-out metrics)` is called (e.g. to checkpoint). With `patience`, training stops early
    once the held-out loss has not improved for that many evaluations, and the state of the
    best one is returned (the best of this call: a resumed fit starts its search afresh).
    """
    rows = len(train[0])
    size = min(batch_size, rows)
    metrics: dict[str, float] = {}
    best: tuple[float, RMState, dict[str, float]] | None = None
    waited = 0
    bar = tqdm(range(int(state.step), steps), desc="reward model", unit="step",
               disable=not progress)
    for t in bar:
        idx = np.random.default_rng([seed, t]).choice(rows, size=size, replace=False)
        state, train_metrics = train_step(state, tuple(x[idx] for x in train))
        if (eval_every and (t + 1) % eval_every == 0) or t + 1 == steps:
            metrics = {k: float(v) for k, v in evaluate(state.params, held_out).items()}
            bar.set_postfix(train_loss=f"{float(train_metrics['loss']):.3f}",
                            held_out_acc=f"{metrics['accuracy']:.3f}")
            if on_eval is not None:
                on_eval(state, metrics)
            if patience is not None:
                if best is None or metrics["loss"] < best[0]:
                    # a copy: the train step donates the state it is given
                    best, waited = (metrics["loss"], jax.tree.map(jnp.copy, state), metrics), 0
                else:
                    waited += 1
                    if waited >= patience:
                        break
    if best is not None:
        return best[1], best[2]
    if not metrics:
        metrics = {k: float(v) for k, v in evaluate(state.params, held_out).items()}
    return state, metrics
