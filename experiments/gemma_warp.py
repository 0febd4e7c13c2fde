"""The main job: WARP on Gemma, end to end (default: the self-contained CPU demo).

    python -m experiments.gemma_warp [--config=experiments/configs/gemma_warp.py:cpu_demo]
        [--workdir=workdir/cpu_demo] [--config.warp.steps=200 ...]

Variants: cpu_demo, test, and the paper's hyper-parameters on local checkpoints gemma_2b,
gemma_7b_paper, gemma4_e4b and gemma4_26b_a4b (experiments/configs/gemma_warp.py).

Writes pareto_front.json/.png, summary.md, metrics.jsonl, TensorBoard events and the final
policy (Hugging Face safetensors) to the workdir; rerunning with the same workdir resumes.

Completions end at the tokenizer's </s> and at any piece in --config.rl.stop_pieces. For an
instruction-tuned Gemma (variants gemma_2b / gemma_7b_paper), --config.task.chat=True wraps
each prompt in Gemma's chat turns and ends completions at <end_of_turn>. --config.mesh.data,
.fsdp and .model split each run's devices (the M runs take one slice of the mesh each);
--config.rl.microbatches and --config.rl.remat cut the update's activation memory. The policy
trains in float32 weights; --config.model.dtype is the compute dtype.

On a multi-host TPU pod slice, run the same command on every host with --distributed
(launch/tpu.sh does); elsewhere give --coordinator_address, --num_processes and --process_id.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from warp_jax import backends, sharding, warp
from warp_jax.workdir import os_error_line

BAD_FLAG = (flags.Error, AttributeError, KeyError, TypeError, ValueError)
# What a user's inputs cause (an unreadable or damaged file, a bad value): one line, exit
# code 2. Anything else is a bug: a traceback.
USER_ERRORS = (OSError, ValueError)


def fail(error: BaseException) -> None:
    """A bad flag, config override or config value: one line on stderr, exit code 2."""
    while error.args and isinstance(error.args[0], BaseException):  # unwrap re-raises
        error = error.args[0]
    if isinstance(error, OSError):
        text = os_error_line(error)
    else:
        text = str(error.args[0]) if error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[-1] if "Traceback" in text else " ".join(lines)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (*BAD_FLAG, SyntaxError) as e:
        fail(ValueError(f"--config: {e}") if isinstance(e, SyntaxError) else e)


def load_config():
    """The parsed config; a config file that could not be loaded is one line."""
    config = flags.FLAGS.config
    try:
        config.rl  # noqa: B018 (ml_collections defers a missing file's error to the first read)
        return config
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(ValueError(f"--config: {lines[-1]}"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    config = load_config()
    backends.configure_process(config.rl.sampler_backend)  # before JAX starts
    f = flags.FLAGS
    cluster = (f.coordinator_address, f.num_processes, f.process_id)
    if f.distributed or any(x is not None for x in cluster):
        if f.coordinator_address and None in cluster:
            fail(ValueError("--coordinator_address needs --num_processes and --process_id"))
        try:
            sharding.initialize_distributed(*cluster)
        except ValueError as e:  # no cluster detected, or a bad address
            fail(ValueError(f"--distributed: {e} (give --coordinator_address, "
                             "--num_processes and --process_id)"))
    workdir = pathlib.Path(flags.FLAGS.workdir)
    try:
        result = warp.run(config, workdir)
    except USER_ERRORS as e:
        fail(e)
    if sharding.is_main_process():
        print(f"final front (eta, proxy reward, KL): "
              f"{[(eta, round(r, 3), round(kl, 2)) for eta, r, kl in result.front]}")
        print(f"outputs in {workdir}: pareto_front.json, pareto_front.png, summary.md, "
              "metrics.jsonl, tensorboard/, final_policy/")


def define_config_flag(default: str = "gemma_warp.py") -> None:
    """`--config` (`default` in experiments/configs/, optionally with :variant) and its
    `--config.*` overrides. ml_collections applies the overrides while defining the flag, so
    a typo in one surfaces here, as one line, rather than in absl's parsing."""
    try:
        config_flags.DEFINE_config_file(
            "config", str(pathlib.Path(__file__).parent / "configs" / default),
            "experiment config file, optionally with :variant", lock_config=True)
    except BAD_FLAG as e:
        fail(e)


def cli() -> None:
    define_config_flag()
    flags.DEFINE_string("workdir", "workdir/cpu_demo", "outputs and checkpoints (with several "
                        "processes: a directory that every process sees)")
    flags.DEFINE_bool("distributed", False, "join a multi-process job (one process per host of "
                      "a TPU pod slice; on Cloud TPU the processes find each other)")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, where JAX does not "
                        "detect the cluster (implies --distributed)")
    flags.DEFINE_integer("num_processes", None, "the number of processes (with "
                         "--coordinator_address)")
    flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
