"""The main job: WARP on Gemma, end to end (default: the self-contained CPU demo).

    python -m experiments.gemma_warp [--config=experiments/configs/gemma_warp.py:cpu_demo] \
        [--workdir=workdir/cpu_demo] [--config.warp.steps=200 ...]

Writes pareto_front.json/.png, summary.md, metrics.jsonl, TensorBoard events and the final
policy (Hugging Face safetensors) to the workdir; rerunning with the same workdir resumes.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from warp_jax import warp

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "gemma_warp.py"),
    "experiment config file, optionally with :variant", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/cpu_demo", "outputs and checkpoints")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        result = warp.run(_CONFIG.value, _WORKDIR.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    workdir = pathlib.Path(_WORKDIR.value)
    print(f"final front (eta, proxy reward, KL): "
          f"{[(eta, round(r, 3), round(kl, 2)) for eta, r, kl in result.front]}")
    print(f"outputs in {workdir}: pareto_front.json, pareto_front.png, summary.md, "
          "metrics.jsonl, tensorboard/, final_policy/")


if __name__ == "__main__":
    app.run(main)
