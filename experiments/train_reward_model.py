r"""Train a Gemma reward model on preference pairs with the Bradley–Terry loss.

    python -m experiments.train_reward_model --data prefs.jsonl --workdir /tmp/rm \
        [--tokenizer tokenizer.model | --tokenizer-vocab 512] [--init HF_DIR | --preset tiny]

`--data` is a local jsonl, json, parquet or csv file, a directory of shards or a
`datasets.save_to_disk` directory, in TRL's preference formats: `{"prompt", "chosen",
"rejected"}` strings, a conversation as the prompt with the assistant's messages as the
answers, or the implicit-prompt form (`chosen` and `rejected` alone, split at their common
prefix); conversations are rendered with the chat template of `--chat-template` (or
`--init`). A held-out split
(`--eval-fraction`) reports loss and accuracy as training goes; checkpoints go to
`WORKDIR/checkpoints/reward_model` and a rerun with the same workdir resumes from the last one
(`WORKDIR/arguments.json` records the arguments and the data's fingerprint: a rerun may change
only --steps, --eval-every, --fsdp, --model and --remat).
The trained model is written to `WORKDIR/hf` as a Hugging Face `*ForSequenceClassification`
(`num_labels=1`): WARP's `--config.reward.hf_dir`, or transformers, read it. The weights and
Adam moments are sharded over the devices (`--fsdp`, `--model`); `--remat` trades compute for
activation memory.
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from warp_jax import backends, rewards, sharding, sources
from warp_jax.checkpoint import Checkpoints
from warp_jax.gemma import GemmaConfig, hf
from warp_jax.gemma.tokenizer import Tokenizer
from warp_jax.workdir import fingerprint, os_error_line, record, writable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preference pairs: a jsonl, json, parquet or "
                   "csv file, a directory of shards or a save_to_disk directory")
    p.add_argument("--prompt-column", default="prompt",
                   help="the prompts' column (absent: the implicit-prompt form)")
    p.add_argument("--chosen-column", default="chosen", help="the preferred answers' column")
    p.add_argument("--rejected-column", default="rejected",
                   help="the other answers' column")
    p.add_argument("--split", default="", help="of a saved DatasetDict or Hub-named shards")
    p.add_argument("--chat-template", help="a directory of tokenizer files whose chat "
                   "template renders conversations (default: --init's)")
    p.add_argument("--workdir", required=True, help="checkpoints and the tokenizer go here")
    p.add_argument("--tokenizer", help="a SentencePiece tokenizer.model")
    p.add_argument("--tokenizer-vocab", type=int, default=512,
                   help="without --tokenizer: train one of this size on the data")
    p.add_argument("--init", help="a Hugging Face Gemma directory (CausalLM or "
                                  "SequenceClassification) to start from")
    p.add_argument("--preset", default="tiny", help="without --init: a random GemmaConfig preset")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=64, help="tokens per prompt + response")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="what to do with a malformed jsonl line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", type=int, default=0,
                   help="devices that shard the weights and split the batch (0: all the "
                        "devices --model leaves)")
    p.add_argument("--model", type=int, default=1,
                   help="tensor-parallel devices (heads, MLP, vocabulary)")
    p.add_argument("--remat", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory)")
    return p


def _check(args) -> None:
    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    for name in ("steps", "batch_size", "max_len", "eval_every", "tokenizer_vocab"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}")


def _mesh(args, batch_size: int):
    """The device mesh: `--model` tensor-parallel devices times `--fsdp` ones."""
    shape = sharding.mesh_shape(jax.device_count(), data=1, fsdp=args.fsdp, model=args.model,
                                batch_size=batch_size,
                                names={"fsdp": "--fsdp", "model": "--model",
                                       "mesh": "--fsdp x --model (data 1)",
                                       "batch_size": "the batch of pairs"})
    return sharding.make_mesh(**shape)


# Arguments a rerun in the same workdir may change: how far it trains, how often it
# evaluates, and how it is laid out on the devices.
_MAY_CHANGE = ("--steps", "--eval-every", "--fsdp", "--model", "--remat")


def _recorded(args) -> dict:
    """What made a workdir's outputs: the arguments, with the data's and the tokenizer's
    fingerprints (and the init's config.json), as `arguments.json` records them."""
    values = {f"--{k.replace('_', '-')}": v for k, v in sorted(vars(args).items())
              if k not in ("workdir",)}
    values["--data"] = {"path": str(args.data), "sha256": fingerprint(args.data)}
    if args.tokenizer:
        values["--tokenizer"] = {"path": str(args.tokenizer),
                                 "sha256": fingerprint(args.tokenizer)}
    if args.init:
        values["--init"] = {"path": str(args.init),
                            "config_sha256": fingerprint(f"{args.init}/config.json")}
    return values


def run(args) -> dict[str, float]:
    """Trains and returns the final held-out metrics."""
    _check(args)
    pairs = sources.load_preferences(
        args.data, (args.prompt_column, args.chosen_column, args.rejected_column), args.split,
        template=sources.ChatTemplate(args.chat_template or args.init), on_error=args.on_error)
    same = sum(p.chosen == p.rejected for p in pairs)
    if same and len(pairs) - same >= 2:
        print(f"warning: {args.data}: {same} of {len(pairs)} pairs have chosen equal to "
              "rejected and teach nothing; they are left out", file=sys.stderr)
    pairs = [p for p in pairs if p.chosen != p.rejected]
    if len(pairs) < 2:
        raise ValueError(f"{args.data}: need at least 2 preference pairs whose chosen and "
                         f"rejected differ, found {len(pairs)}"
                         + (f" ({same} have chosen equal to rejected)" if same else ""))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pairs))
    n_eval = max(1, int(len(pairs) * args.eval_fraction))
    held_out, train = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
    batch_size = min(args.batch_size, len(train))
    mesh = _mesh(args, batch_size)  # a mesh that does not fit fails before anything is written

    workdir = writable(args.workdir)
    given = Tokenizer(args.tokenizer) if args.tokenizer else None
    cfg = hf.read_config(args.init) if args.init else None
    # The inputs read, before anything is written: what made this workdir's outputs.
    record(_recorded(args), workdir, "arguments.json", _MAY_CHANGE, "other arguments")
    checkpoints = Checkpoints(workdir / "checkpoints")
    if given is not None:
        tokenizer = given
    elif (workdir / "tokenizer.model").exists():  # resuming: the tokenizer trained before
        tokenizer = Tokenizer(workdir / "tokenizer.model")
    else:
        texts = [p.prompt + p.separator + answer for p in train
                 for answer in (p.chosen, p.rejected)]
        tokenizer = Tokenizer.train(texts, args.tokenizer_vocab)
        tokenizer.save(workdir / "tokenizer.model")
    if cfg is not None:
        params = hf.params_from_hf(args.init, cfg)
        params.setdefault("score", np.zeros((cfg.embed_dim,), np.dtype(cfg.param_dtype)))
    else:
        cfg = GemmaConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size)
        params = nn.unbox(rewards.RewardModel(cfg).init(
            jax.random.key(args.seed), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool))[
            "params"])
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model "
                         f"{cfg.vocab_size}")

    optimizer = optax.adam(args.learning_rate)
    step_fn, evaluate, init = rewards.make_reward_train_step(cfg, optimizer, mesh=mesh,
                                                             remat=args.remat)
    state = init(params)
    saved = checkpoints.restore_latest("reward_model", state)
    if saved is not None:
        start, state = saved
        print(f"resumed from step {start}")
    eval_batch = rewards.encode_pairs(tokenizer, held_out, args.max_len)
    train_batch = rewards.encode_pairs(tokenizer, train, args.max_len)
    state, metrics = rewards.fit(
        step_fn, evaluate, state, train_batch, eval_batch, steps=args.steps,
        batch_size=batch_size, seed=args.seed, eval_every=args.eval_every,
        on_eval=lambda state, _: checkpoints.save("reward_model", int(state.step), state))
    checkpoints.wait()
    checkpoints.close()
    hf.save_hf(jax.device_get(state.params), cfg, workdir / "hf")
    print(f"held-out ({len(held_out)} pairs): accuracy {metrics['accuracy']:.3f}, "
          f"Bradley-Terry loss {metrics['loss']:.4f}")
    if not metrics["accuracy"] > 0.5:
        print(f"warning: the reward model learned nothing: held-out accuracy "
              f"{metrics['accuracy']:.3f} on {len(held_out)} pairs is at or below chance "
              "(0.5); more pairs, steps or a higher --learning-rate may help", file=sys.stderr)
    print(f"reward model (Hugging Face, for --config.reward.hf_dir): {workdir / 'hf'}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    backends.configure_process("xla")  # on the CPU straight away where there is no TPU
    try:
        run(args)
    except (ValueError, OSError) as e:
        print(f"error: {os_error_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
