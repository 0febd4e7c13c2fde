"""`python -m experiments.train_reward_model` end to end on generated preferences."""

import json

import numpy as np
import pytest

from experiments import train_reward_model

GOOD, BAD = ("great", "lovely", "superb", "fun"), ("awful", "dull", "boring", "bad")


def _write_pairs(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            good, bad = rng.choice(GOOD), rng.choice(BAD)
            f.write(json.dumps({"prompt": "the movie was", "chosen": f"{good} and {good}",
                                "rejected": f"{bad} and {good}"}) + "\n")


def test_trains_reports_held_out_accuracy_and_resumes(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    _write_pairs(data, 200)
    argv = ["--data", str(data), "--workdir", str(tmp_path / "rm"), "--tokenizer-vocab", "40",
            "--steps", "60", "--eval-every", "30", "--batch-size", "16", "--learning-rate",
            "3e-3", "--max-len", "12"]
    metrics = train_reward_model.run(train_reward_model._parser().parse_args(argv))
    assert metrics["accuracy"] > 0.9
    assert "held-out (20 pairs): accuracy" in capsys.readouterr().out
    assert (tmp_path / "rm" / "checkpoints" / "reward_model" / "60").exists()
    train_reward_model.run(train_reward_model._parser().parse_args(
        [*argv[:-8], "--steps", "70", *argv[-6:]]))
    assert "resumed from step 60" in capsys.readouterr().out


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": 1}\n')
    with pytest.raises(SystemExit) as exit_info:
        train_reward_model.main(["--data", str(data), "--workdir", str(tmp_path / "rm")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefs.jsonl:2: malformed preference pair" in err[0]
    with pytest.raises(SystemExit):
        train_reward_model.main(["--data", str(data), "--workdir", str(tmp_path / "rm"),
                                 "--eval-fraction", "1.5"])
    assert "--eval-fraction must be in (0, 1)" in capsys.readouterr().err
