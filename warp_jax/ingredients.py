"""What a WARP experiment starts from: tokenizer, SFT policy, rewards and prompts.

For the built-in review task everything is made here, deterministically from the seed and
checkpointed (a SentencePiece tokenizer, a tiny Gemma pre-trained on the reviews, a reward
model trained on SFT completions labelled by the VADER oracle); otherwise it is loaded from
local checkpoints named by the config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

from warp_jax import data, evaluation, rewards, sampling, sft, sharding, sources, streams
from warp_jax.checkpoint import Checkpoints
from warp_jax.gemma import Gemma, GemmaConfig, abstract_params, hf
from warp_jax.gemma.tokenizer import Tokenizer
from warp_jax.settings import MOVIE_PARTS


@dataclasses.dataclass
class Ingredients:
    cfg: GemmaConfig
    tokenizer: Tokenizer
    sft_params: Any
    boxed_params: Any  # jax.eval_shape of the init: logical axis names for sharding
    reward_model: tuple[GemmaConfig, Any]  # the proxy reward: a RewardModel's config, params
    oracle: Callable | None  # a host reward scoring what the proxy approximates, if any
    train_prompts: data.PromptBatches
    eval_prompts: tuple[np.ndarray, np.ndarray]
    eval_texts: list[str]
    end_ids: tuple[int, ...]  # tokens that end a completion: eos, rl.stop_pieces, <end_of_turn>
    reward_norm: tuple[float, float] | None = None  # the proxy's (mean, std) on SFT samples


def vader_oracle(tokenizer: Tokenizer) -> rewards.TextReward:
    """The built-in task's oracle: VADER's compound sentiment of each completion, in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return rewards.TextReward(
        lambda prompts, completions: [analyzer.polarity_scores(c)["compound"]
                                      for c in completions], tokenizer)


def prepare(c, workdir: pathlib.Path) -> Ingredients:
    ckpt = Checkpoints(workdir / "checkpoints")
    try:
        return _local(c, workdir) if c.task.name == "prompts" else _built_in(c, workdir, ckpt)
    finally:
        ckpt.wait()
        ckpt.close()


def _end_ids(c, tokenizer: Tokenizer, template: sources.ChatTemplate | None = None
             ) -> tuple[int, ...]:
    """The tokens that end a completion: eos, `rl.stop_pieces` and, for prompts `template`
    rendered, the piece that closes a turn in it (`<end_of_turn>`, Gemma 4's `<turn|>`),
    which the tokenizer must hold (and Gemma's two turn markers, where the template is the
    hand-written fallback)."""
    turn = ()
    if template is not None and template.used:
        pieces = sources.CHAT_PIECES if template.tokenizer is None else template.stop_pieces()
        try:
            turn = tokenizer.piece_ids(pieces)[-1:]
        except ValueError as e:
            raise ValueError(f"config.task.chat = {c.task.chat}: {e}; chat prompts need an "
                             "instruction-tuned Gemma's tokenizer") from None
    try:
        extra = tokenizer.piece_ids(c.rl.stop_pieces)
    except ValueError as e:
        raise ValueError(f"config.rl.stop_pieces = {tuple(c.rl.stop_pieces)!r}: {e}") from None
    return tuple(dict.fromkeys((tokenizer.eos_id, *extra, *turn)))


@dataclasses.dataclass
class _Texts:
    """A built-in task's text: what the tokenizer and the SFT policy learn, the RL and the
    evaluation prompts, and the real snippets by part (sft, gold, rl, eval) they come from."""

    corpus: list[str]
    train_prompts: list[str]
    eval_prompts: list[str]
    parts: dict[str, list[data.Snippet]] = dataclasses.field(default_factory=dict)


def _texts(c) -> _Texts:
    if c.task.name == "reviews":
        return _Texts(data.review_corpus(c.task.corpus_size, streams.seed(c.seed, "corpus")),
                      data.review_prompts(c.task.num_prompts,
                                          streams.seed(c.seed, "train_prompts")),
                      data.review_prompts(c.task.eval_prompts,
                                          streams.seed(c.seed, "eval_prompts"), "eval"))
    # Real review snippets, split by movie: the SFT policy learns one part, the gold
    # classifier another; RL and evaluation prompts open snippets of two more.
    parts = data.split_by_movie(data.rotten_tomatoes(), dict(zip(
        MOVIE_PARTS, c.task.movie_split, strict=True)), streams.seed(c.seed, "movie_split"))

    def openings(part: str, num: int, taken: set[str] = frozenset()) -> list[str]:
        texts = [t for t in dict.fromkeys(data.opening(s.text, c.task.prompt_words)
                                          for s in parts[part]) if t not in taken]
        order = np.random.default_rng(streams.seed(c.seed, f"{part}_prompts")).permutation(
            len(texts))
        return [texts[i] for i in order[:num]]

    train = openings("rl", c.task.num_prompts)
    # An opening that other movies' snippets share ("It's a film that") is no held-out prompt.
    seen = {data.opening(s.text, c.task.prompt_words) for s in parts["sft"] + parts["rl"]}
    return _Texts([s.text for s in parts["sft"]], train,
                  openings("eval", c.task.eval_prompts, seen), parts)


def _oracle(c, texts: _Texts, tokenizer: Tokenizer, workdir: pathlib.Path):
    """The built-in task's oracle (`reward.oracle`): VADER, or the gold classifier fitted on
    the fresh/rotten labels of the real reviews' gold part (its accuracy on a held-out tenth
    of that part, by a classifier fitted on the rest, is recorded in `workdir/gold.json`)."""
    if c.reward.oracle == "vader":
        return vader_oracle(tokenizer)
    if c.reward.oracle != "gold":
        return None
    gold = texts.parts["gold"]
    held_out = [s for i, s in enumerate(gold) if i % 10 == 0]
    rest = [s for i, s in enumerate(gold) if i % 10]
    probe = rewards.TextClassifier([s.text for s in rest], [s.fresh for s in rest])
    record = {"texts": len(gold), "held_out": len(held_out), "held_out_accuracy": probe.accuracy(
        [s.text for s in held_out], [s.fresh for s in held_out])}
    if sharding.is_main_process():
        (workdir / "gold.json").write_text(json.dumps(record, indent=1))
    return rewards.TextReward(rewards.TextClassifier([s.text for s in gold],
                                                     [s.fresh for s in gold]), tokenizer)


def _built_in(c, workdir: pathlib.Path, ckpt: Checkpoints) -> Ingredients:
    """The built-in tasks ('reviews', 'rotten_tomatoes'): a tokenizer and an SFT policy
    trained on the task's text, a proxy reward model trained on oracle-labelled pairs of SFT
    completions and, with `reward.normalize`, standardised on SFT completions."""
    texts = _texts(c)
    if sharding.is_main_process():
        (workdir / "task.json").write_text(json.dumps(
            {"snippets_per_part": {name: len(part) for name, part in texts.parts.items()},
             "train_prompts": len(texts.train_prompts),
             "eval_prompts": len(texts.eval_prompts)}, indent=1))
    path = workdir / "tokenizer.model"
    missing = not path.exists()
    sharding.barrier("tokenizer looked up")  # every process looks before process 0 writes
    if missing:
        if sharding.is_main_process():
            try:
                Tokenizer.train(texts.corpus, c.task.vocab_size).save(path)
            except RuntimeError as e:  # SentencePiece: too little text for the vocabulary
                field = "task.movie_split" if c.task.name == "rotten_tomatoes" else \
                    "task.corpus_size"
                raise ValueError(f"config.{field}: the {len(texts.corpus)} SFT texts cannot "
                                 f"train a tokenizer of task.vocab_size = {c.task.vocab_size} "
                                 f"pieces ({str(e).strip().splitlines()[-1][:120]})") from None
        sharding.barrier("tokenizer saved")
    tokenizer = Tokenizer(path)
    end_ids = _end_ids(c, tokenizer)
    cfg = GemmaConfig.from_preset(c.model.preset, vocab_size=tokenizer.vocab_size,
                                  dtype=c.model.dtype, param_dtype="float32",
                                  scan_layers=c.model.scan_layers, **dict(c.model.overrides))
    boxed = abstract_params(cfg)
    init = nn.unbox(Gemma(cfg).init(streams.key(c.seed, "init"), jnp.zeros((1, 1), jnp.int32))[
        "params"])
    # Several processes train the SFT policy and the reward model alike, each on its own
    # devices, and checkpoint them as one global array.
    saved = ckpt.restore_latest("sft", sharding.host_local_to_global(init))
    if saved is not None:
        sft_params = saved[1]
    else:
        sft_params, _ = sft.train_lm(cfg, init, tokenizer, texts.corpus, steps=c.sft.steps,
                                     batch_size=c.sft.batch_size, max_len=c.sft.max_len,
                                     learning_rate=c.sft.learning_rate,
                                     seed=streams.seed(c.seed, "sft"),
                                     progress=sharding.is_main_process())
        sft_params = sharding.host_local_to_global(sft_params)
        ckpt.save("sft", 0, sft_params)

    oracle = _oracle(c, texts, tokenizer, workdir)
    rm_like = {**sft_params, "score": jnp.zeros((cfg.embed_dim,), cfg.param_dtype)}
    saved = ckpt.restore_latest("reward_model", sharding.host_local_to_global(rm_like))
    if saved is not None:
        rm_params = saved[1]
    else:
        if oracle is None:
            raise ValueError("config.reward.oracle = '': the built-in tasks train their reward "
                             "model on oracle labels; set it to 'vader' or 'gold'")
        rm_params = sharding.host_local_to_global(_train_reward_model(
            c, cfg, tokenizer, end_ids, sft_params, rm_like, texts.train_prompts, oracle,
            workdir))
        ckpt.save("reward_model", 0, rm_params)
    norm = (_reward_norm(c, cfg, tokenizer, end_ids, sft_params, (cfg, rm_params),
                         texts.train_prompts, workdir, oracle) if c.reward.normalize else None)
    return Ingredients(cfg, tokenizer, sft_params, boxed, (cfg, rm_params), oracle,
                       data.PromptBatches(texts.train_prompts, tokenizer, c.rl.batch_size,
                                          c.task.prompt_len),
                       tokenizer.encode_batch(texts.eval_prompts, c.task.prompt_len),
                       texts.eval_prompts, end_ids, norm)


def _reward_norm(c, cfg, tokenizer, end_ids, sft_params, reward_model, prompts,
                 workdir: pathlib.Path, oracle=None) -> tuple[float, float]:
    """The proxy's mean and standard deviation on `reward.norm_samples` SFT completions of
    the training prompts at the RL temperature (recorded in `workdir/reward_model.json`, and
    read back from it on resume), with the proxy's Spearman correlation to the `oracle` on
    those fresh samples, if there is one (`sft_spearman`)."""
    path = workdir / "reward_model.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if "mean" not in record:
        rng = np.random.default_rng(streams.seed(c.seed, "reward_norm_prompts"))
        rows = rng.choice(len(prompts), c.reward.norm_samples)
        tokens, mask = tokenizer.encode_batch([prompts[i] for i in rows], c.task.prompt_len)
        out = sampling.sample(sft_params, cfg, tokens, mask, streams.key(c.seed, "reward_norm"),
                              c.rl.max_new_tokens, temperature=c.rl.temperature,
                              eos_id=end_ids, backend=c.rl.sampler_backend)
        proxy = rewards.model_reward(*reward_model, c.reward.pooling)
        scores = rewards.score(proxy, (tokens, mask, out.tokens, out.mask))
        normalized = rewards.standardize(proxy, scores)
        record.update(mean=float(normalized.mean), std=float(normalized.std),
                      norm_samples=len(scores))
        if oracle is not None:
            gold = rewards.score(oracle, (tokens, mask, out.tokens, out.mask))
            record["sft_spearman"] = evaluation.rank_correlation(scores, gold)
        if sharding.is_main_process():
            path.write_text(json.dumps(record, indent=1))
    return record["mean"], record["std"]


def _train_reward_model(c, cfg, tokenizer, end_ids, sft_params, rm_params, prompts, oracle,
                        workdir: pathlib.Path):
    """Bradley–Terry on pairs of SFT completions of the same training prompt, sampled at
    `reward.pair_temperature` and labelled by the oracle: hard (its ranking, ties dropped)
    or soft (`reward.labels`: P(chosen preferred) = sigmoid of the gold logits'
    difference, so a near-tie teaches a small margin). Adam at `reward.learning_rate`, with
    `reward.warmup_steps` of warm-up then cosine decay, held-out evaluations every
    `reward.eval_every` steps and early stopping after `reward.patience` of them without a
    better held-out loss: the proxy reward the RL runs optimise. Its pairs, held-out curve
    and accuracy, overall and by oracle margin, go to `workdir/reward_model.json`."""
    tokens, mask = tokenizer.encode_batch(prompts, c.task.prompt_len)
    reps = -(-c.reward.pairs // len(prompts))
    tokens, mask = np.repeat(tokens, 2 * reps, axis=0), np.repeat(mask, 2 * reps, axis=0)
    # in chunks of _SAMPLE_ROWS: tens of thousands of rows at once hold gigabytes of cache
    chunks = []
    for i in range(0, len(tokens), _SAMPLE_ROWS):
        out = sampling.sample(sft_params, cfg, tokens[i:i + _SAMPLE_ROWS],
                              mask[i:i + _SAMPLE_ROWS], streams.key(c.seed, "reward_pairs", i),
                              c.rl.max_new_tokens, temperature=c.reward.pair_temperature,
                              eos_id=end_ids, backend=c.rl.sampler_backend)
        chunks.append(sharding.to_host((out.tokens, out.mask)))
    completion, cmask = (np.concatenate(x) for x in zip(*chunks, strict=True))
    scores = np.asarray(oracle(tokens, mask, completion, cmask), np.float64).reshape(-1, 2)
    soft = c.reward.labels == "soft"
    label_scores = special.logit(np.clip(scores, 1e-6, 1 - 1e-6)) if soft else scores
    margin = label_scores[:, 0] - label_scores[:, 1]
    seq = np.concatenate([tokens, completion], 1).reshape(-1, 2, tokens.shape[1] +
                                                          completion.shape[1])
    seq_mask = np.concatenate([mask, cmask], 1).reshape(seq.shape)
    # pairs in random order: the held-out tenth must not be the first prompts' pairs
    order = np.random.default_rng(streams.seed(c.seed, "reward_pair_order")).permutation(
        len(margin))
    keep = order[margin[order] != 0][:c.reward.pairs]
    if len(keep) < 2:
        raise ValueError(f"config.reward.pairs: the oracle ranked only {len(keep)} of "
                         f"{len(scores)} pairs of SFT completions (the rest tie): no proxy to "
                         "train")
    first = margin[keep] > 0
    pairs = (np.where(first[:, None], seq[keep, 0], seq[keep, 1]),
             np.where(first[:, None], seq_mask[keep, 0], seq_mask[keep, 1]),
             np.where(first[:, None], seq[keep, 1], seq[keep, 0]),
             np.where(first[:, None], seq_mask[keep, 1], seq_mask[keep, 0]))
    gap = np.abs(margin[keep])
    if soft:
        pairs += ((1 / (1 + np.exp(-gap))).astype(np.float32),)
    lr = c.reward.learning_rate
    if c.reward.warmup_steps:
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, c.reward.warmup_steps, c.reward.steps)
    step, evaluate, init = rewards.make_reward_train_step(cfg, optax.adam(lr), soft_labels=soft,
                                                          pooling=c.reward.pooling)
    n = len(keep)
    held_out = np.arange(n) < max(1, n // 10)
    train = tuple(x[~held_out] for x in pairs)
    curve: list[dict] = []
    state, metrics = rewards.fit(
        step, evaluate, init(rm_params), train, tuple(x[held_out] for x in pairs),
        steps=c.reward.steps, batch_size=c.reward.batch_size,
        seed=streams.seed(c.seed, "reward_model"), eval_every=c.reward.eval_every or None,
        on_eval=lambda s, m: curve.append({"step": int(s.step), **m}),
        patience=c.reward.patience or None, progress=sharding.is_main_process())
    pairs_held_out = int(held_out.sum())
    record = {"pairs": len(train[0]), "held_out_pairs": pairs_held_out,
              "held_out_accuracy": metrics["accuracy"], "labels": c.reward.labels,
              "pair_temperature": c.reward.pair_temperature, "steps": int(state.step),
              "curve": curve, "accuracy_by_margin": _accuracy_by_margin(
                  rewards.RewardModel(cfg, pooling=c.reward.pooling), state.params,
                  tuple(x[held_out] for x in pairs[:4]), gap[held_out]),
              "margin_units": "gold logits" if soft else "oracle scores"}
    if sharding.is_main_process():
        print(f"reward model: {record['pairs']} oracle-labelled pairs, held-out accuracy "
              f"{metrics['accuracy']:.3f} on {pairs_held_out}")
        (workdir / "reward_model.json").write_text(json.dumps(record, indent=1))
    if not metrics["accuracy"] > 0.5:
        advice = "raise config.reward.pairs or config.reward.steps"
        if pairs_held_out < _TELLING_PAIRS:  # a few pairs at chance tell nothing either way
            print(f"warning: the proxy reward model's held-out accuracy "
                  f"{metrics['accuracy']:.3f} is at or below chance, on {pairs_held_out} "
                  f"pairs (too few to tell); {advice}", file=sys.stderr)
        elif not c.reward.allow_chance:
            raise ValueError(f"the proxy reward model learned nothing: held-out accuracy "
                             f"{metrics['accuracy']:.3f} on {pairs_held_out} pairs is at or "
                             f"below chance; {advice}, or rerun with "
                             "config.reward.allow_chance=True to go on with it")
    return state.params


_SAMPLE_ROWS = 8192


# Bin edges of the oracle's margin between a pair's completions, for the proxy's accuracy by
# margin: a proxy at chance on near-ties and right on clear pairs is another proxy than one
# right on neither.
MARGIN_BINS = (0.0, 0.25, 0.5, 1.0, 2.0, float("inf"))


def _accuracy_by_margin(model, params, pairs, margin) -> list[dict]:
    """The reward `model`'s accuracy on `pairs` (chosen, mask, rejected, mask) by the oracle
    margin's bin (`MARGIN_BINS`)."""
    score = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))
    right = np.asarray(score(params, pairs[0], pairs[1]) > score(params, pairs[2], pairs[3]))
    out = []
    for lo, hi in itertools.pairwise(MARGIN_BINS):
        inside = (margin >= lo) & (margin < hi)
        out.append({"margin": [lo, hi if np.isfinite(hi) else None], "pairs": int(inside.sum()),
                    "accuracy": float(right[inside].mean()) if inside.any() else None})
    return out


# Held-out pairs from which an accuracy at chance stops the job: on fewer, it is one warning.
_TELLING_PAIRS = 20


def _tokenizer_dir(c) -> str:
    """Where the checkpoint's tokenizer files (and chat template) are: `model.hf_dir` if it
    holds them, else the directory of `model.tokenizer`."""
    if (pathlib.Path(c.model.hf_dir) / "tokenizer_config.json").exists():
        return c.model.hf_dir
    return str(pathlib.Path(c.model.tokenizer).parent)


def _local(c, workdir: pathlib.Path) -> Ingredients:
    tokenizer = Tokenizer(c.model.tokenizer)
    # The data first: a bad row is one line before the checkpoints are read.
    template = sources.ChatTemplate(_tokenizer_dir(c))
    prompts = sources.load_prompts(c.task.prompts, c.task.prompt_column, c.task.split,
                                   template=template, chat=c.task.chat)
    if c.task.long_prompts == "refuse":
        for i, length in enumerate(len(tokenizer.encode(p)) for p in prompts):
            if length > c.task.prompt_len:
                raise ValueError(f"config.task.prompts: prompt {i + 1} of {c.task.prompts} "
                                 f"takes {length} tokens, more than "
                                 f"task.prompt_len = {c.task.prompt_len} (task.long_prompts "
                                 "= 'refuse'; 'truncate' keeps BOS and its end)")
    end_ids = _end_ids(c, tokenizer, template)
    # The policy's weights stay float32 (see reinforce.make_train_step); the reward model is
    # frozen, so its weights take the compute dtype.
    cfg = hf.read_config(c.model.hf_dir).replace(
        dtype=c.model.dtype, param_dtype="float32", scan_layers=c.model.scan_layers)
    sft_params = hf.params_from_hf(c.model.hf_dir, cfg)
    rm_cfg = hf.read_config(c.reward.hf_dir).replace(
        dtype=c.model.dtype, param_dtype=c.model.dtype, scan_layers=c.model.scan_layers)
    if rm_cfg.vocab_size != cfg.vocab_size:
        raise ValueError("config.reward.hf_dir: the reward model's vocabulary differs from the "
                         "policy's; wrap it in a rewards.TextReward with its own tokenizer")
    rm_params = hf.params_from_hf(c.reward.hf_dir, rm_cfg)
    if "score" not in rm_params:
        raise ValueError(f"config.reward.hf_dir = {c.reward.hf_dir!r}: no 'score.weight'; "
                         "expected a *ForSequenceClassification checkpoint")
    if len(prompts) <= c.task.eval_prompts:
        raise ValueError(f"config.task.prompts: {len(prompts)} prompts, but "
                         f"task.eval_prompts = {c.task.eval_prompts} are held out")
    train, held_out = prompts[:-c.task.eval_prompts], prompts[-c.task.eval_prompts:]
    norm = (_reward_norm(c, cfg, tokenizer, end_ids, sft_params, (rm_cfg, rm_params), train,
                         workdir) if c.reward.normalize else None)
    return Ingredients(cfg, tokenizer, sft_params, abstract_params(cfg), (rm_cfg, rm_params), None,
                 data.PromptBatches(train, tokenizer, c.rl.batch_size, c.task.prompt_len),
                 tokenizer.encode_batch(held_out, c.task.prompt_len), held_out, end_ids, norm)
