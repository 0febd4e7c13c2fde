"""`python -m experiments.train_reward_model` end to end on generated preferences."""

import json

import numpy as np
import pytest
import torch
import transformers

from experiments import train_reward_model
from warp_jax import rewards
from warp_jax.gemma import hf
from warp_jax.gemma.tokenizer import Tokenizer

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
    out = capsys.readouterr().out
    assert "held-out (20 pairs): accuracy" in out
    assert f"reward model (Hugging Face, for --config.reward.hf_dir): {tmp_path / 'rm' / 'hf'}" \
        in out
    assert (tmp_path / "rm" / "checkpoints" / "reward_model" / "60").exists()
    # The exported model scores the held-out pairs as the trained params do.
    tokenizer = Tokenizer(tmp_path / "rm" / "tokenizer.model")
    pairs = rewards.read_preferences(data)[:8]
    chosen_tokens, chosen_mask, *_ = rewards.encode_pairs(tokenizer, pairs, 12)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm" / "hf").eval()
    cfg = hf.config_from_hf(model.config)
    params = hf.params_from_hf(tmp_path / "rm" / "hf", cfg)
    ours = rewards.RewardModel(cfg).apply({"params": params}, chosen_tokens, chosen_mask)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(np.asarray(chosen_tokens, np.int64)),
                    attention_mask=torch.from_numpy(np.asarray(chosen_mask, np.int64)),
                    position_ids=torch.from_numpy(np.maximum(np.cumsum(chosen_mask, 1) - 1, 0))
                    ).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    resumed = train_reward_model.run(train_reward_model._parser().parse_args(
        [*argv[:-8], "--steps", "70", *argv[-6:]]))
    assert "resumed from step 60" in capsys.readouterr().out
    straight = train_reward_model.run(train_reward_model._parser().parse_args(
        [*argv[:3], str(tmp_path / "straight"), *argv[4:-8], "--steps", "70", *argv[-6:]]))
    assert resumed == pytest.approx(straight, rel=1e-6)


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": 1}\n')
    with pytest.raises(SystemExit) as exit_info:
        train_reward_model.main(["--data", str(data), "--workdir", str(tmp_path / "rm")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}, row 2: no field 'chosen' (fields: prompt)"]
    with pytest.raises(SystemExit):
        train_reward_model.main(["--data", str(data), "--workdir", str(tmp_path / "rm"),
                                 "--eval-fraction", "1.5"])
    assert "--eval-fraction must be in (0, 1)" in capsys.readouterr().err
    _write_pairs(data, 40)
    for flags, message in ((["--batch-size", "12"], "the batch of pairs = 12: must be a "
                            "multiple of mesh data x fsdp = 1 x 8, the devices that split each "
                            "run's rows (8 per run; --model takes devices that do not)"),
                           (["--model", "3"], "--model = 3: must divide the 8 device(s) of "
                            "each run (8 device(s), 1 run(s) at a time)"),
                           (["--fsdp", "8", "--model", "2"], "--fsdp x --model (data 1) = "
                            "(1, 8, 2): data x fsdp x model must be the 8 device(s) of each run "
                            "(8 device(s), 1 run(s) at a time)")):
        with pytest.raises(SystemExit):
            train_reward_model.main(["--data", str(data), "--workdir", str(tmp_path / "rm"),
                                     "--tokenizer-vocab", "30", *flags])
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
