"""The reproduction study: which of the WARP paper's six observations hold at small scale, on
real review text, over several RL seeds (warp_jax.study).

    python -m experiments.reproduce --config=experiments/configs/reproduce.py:full
        --workdir=workdir/reproduce [--report_dir=docs] [--config.study.seeds=5 ...]

Variants: full (3 seeds, about 45 minutes on 2 CPU cores) and smoke (2 seeds, a few
minutes). Writes claims.json (each claim's verdict on the proxy and the gold reward) and
study.json (every evaluated point) to the workdir, and the report, reproduction.md with its
figures and a copy of claims.json under reproduction/, to --report_dir (default: the workdir).
Rerunning with the same workdir resumes; a finished study only rewrites its report.
"""

import pathlib
import shlex
import sys

from absl import app, flags, logging

from experiments import gemma_warp
from warp_jax import backends, sharding, study, study_report
from warp_jax.workdir import writable


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = gemma_warp.load_config()
    backends.configure_process(config.rl.sampler_backend)
    workdir = pathlib.Path(flags.FLAGS.workdir)
    try:
        if flags.FLAGS.report_dir:  # before the study, not after its hours of work
            writable(flags.FLAGS.report_dir, "--report_dir")
        claims = study.run(config, workdir)
        if sharding.is_main_process():
            report = study_report.write(
                workdir, pathlib.Path(flags.FLAGS.report_dir or workdir),
                command="python -m experiments.reproduce " + shlex.join(sys.argv[1:]))
    except gemma_warp.USER_ERRORS as e:
        gemma_warp.fail(e)
    if sharding.is_main_process():
        for claim in claims:
            print(f"claim {claim['claim']} ({claim['reward']}): {claim['verdict']}")
        print(f"claims in {workdir / 'claims.json'}; report {report}")


def cli() -> None:
    gemma_warp.define_config_flag("reproduce.py")
    flags.DEFINE_string("workdir", "workdir/reproduce", "checkpoints, records and claims.json")
    flags.DEFINE_string("report_dir", "", "where reproduction.md and reproduction/ (figures, "
                        "claims.json) go (default: the workdir)")
    app.run(main, flags_parser=gemma_warp.parse_flags)


if __name__ == "__main__":
    cli()
