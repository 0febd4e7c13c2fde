"""launch/tpu.sh passes the job's arguments to every worker's shell intact."""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def test_run_quotes_every_argument_for_the_workers_shell(tmp_path):
    # gcloud runs the ssh --command here instead of on the workers; the workers' python
    # prints the arguments it receives, one per line.
    _executable(tmp_path / "bin" / "gcloud", '#!/usr/bin/env bash\n'
                'while [[ $# -gt 0 ]]; do\n'
                '  if [[ $1 == --command ]]; then exec bash -c "$2"; fi\n'
                '  shift\n'
                'done\n')
    _executable(tmp_path / "home" / "warp_jax" / ".venv" / "bin" / "python",
                '#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    args = ["--config.rl.stop_pieces=('<end_of_turn>',)", "--workdir=/mnt/runs/a b",
            "--config.task.prompts=$HOME/p.jsonl"]
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "HOME": str(tmp_path / "home"), "TPU_NAME": "t", "ZONE": "z"}
    out = subprocess.run(["bash", str(ROOT / "launch" / "tpu.sh"), "run", *args], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["-m", "experiments.gemma_warp", "--distributed", *args]
