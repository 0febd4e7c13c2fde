"""What a user sees for bad input: one line `error: ...` (exit code 2) from every entry point,
before any work, and nothing in the workdir changed."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import train_reward_model
from experiments.configs.gemma_warp import get_config
from warp_jax import data, ingredients, rewards, settings, workdir
from warp_jax.gemma import hf
from warp_jax.gemma.tokenizer import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT}/experiments/configs/gemma_warp.py:test"


def _main(*flags: str) -> tuple[int, list[str]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "experiments.gemma_warp", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


def _listing(path: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b""
            for p in sorted(path.rglob("*"))}


@pytest.fixture
def recorded(tmp_path):
    """A workdir that a run of the test variant started in (its config recorded)."""
    workdir.record_config(get_config("test"), tmp_path)
    (tmp_path / "keep.txt").write_text("results from before")
    return tmp_path


def test_the_main_job_says_one_line_for_bad_files_and_paths(recorded, tmp_path_factory):
    before = _listing(recorded)
    other = tmp_path_factory.mktemp("other")
    syntax = other / "bad_config.py"
    syntax.write_text("def get_config(:\n")
    a_file = other / "a_file"
    a_file.write_text("")
    cases = [
        ((f"--config={other / 'missing.py'}", f"--workdir={recorded}"),
         f"error: --config: [Errno 2] No such file or directory: '{other / 'missing.py'}'"),
        ((f"--config={syntax}", f"--workdir={recorded}"),
         "error: --config: invalid syntax (bad_config.py, line 1)"),
        ((f"--config={CONFIG}", f"--workdir={a_file}"),
         f"error: --workdir '{a_file}': a file, not a directory"),
        ((f"--config={CONFIG}", f"--workdir={a_file / 'below'}"),
         f"error: --workdir '{a_file / 'below'}': a path below a file"),
        ((f"--config={CONFIG}", f"--workdir={recorded}", "--config.rl.beta=nan"),
         "error: config.rl.beta = nan: must be a finite number"),
        ((f"--config={CONFIG}", f"--workdir={recorded}", "--config.rl.grad_clip=-1"),
         "error: config.rl.grad_clip = -1.0: must be >= 0 (0: no clipping)"),
        ((f"--config={CONFIG}", f"--workdir={recorded}", "--config.rl.beta=0.5",
          "--config.warp.steps=7"),
         f"error: {recorded} was made with another config: rl.beta (0.3 -> 0.5), warp.steps "
         "(6 -> 7); rerun with the recorded values (config.json there), or use a new --workdir"),
    ]
    for flags, message in cases:
        code, err = _main(*flags)
        assert (code, err) == (2, [message]), flags
    assert _listing(recorded) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_workdir_is_refused_before_any_work(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"--workdir .*: not writable"):
            workdir.writable(tmp_path / "w")
    finally:
        tmp_path.chmod(0o755)


def test_a_resume_may_change_the_layout_but_nothing_else(tmp_path):
    config = get_config("test")
    workdir.record_config(config, tmp_path)
    config.mesh.model, config.rl.microbatches, config.rl.remat = 2, 2, True
    workdir.record_config(config, tmp_path)  # another slice: allowed, and recorded
    assert json.loads((tmp_path / "config.json").read_text())["mesh"]["model"] == 2
    config.warp.eta_grid = (0.0, 1.0)
    with pytest.raises(ValueError, match=r"another config: warp.eta_grid \(\[0.0, 0.5, 1.0\] "
                                         r"-> \[0.0, 1.0\]\)"):
        workdir.record_config(config, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not the config this workdir recorded"):
        workdir.record_config(get_config("test"), tmp_path)


def test_files_that_are_not_what_they_claim_name_themselves(tmp_path):
    not_spm = tmp_path / "tokenizer.model"
    not_spm.write_bytes(b"\x00 not a model")
    with pytest.raises(ValueError, match=r"tokenizer.model': not a SentencePiece model"):
        Tokenizer(not_spm)
    (tmp_path / "config.json").write_text('{"model_type": "gemma", ')
    with pytest.raises(ValueError, match=r"config.json: not JSON \("):
        hf.read_config(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: no such file"):
        hf.read_config(tmp_path / "nowhere")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a fine prompt\nthe caf\xe9 was\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"prompts.txt:2: not UTF-8 text \(byte 0xe9 at "
                                         r"column 8\)"):
        data.read_prompts(prompts)


def test_preferences_with_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"a"', b'"caf\xe9"') + b"\n" + good + b"\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl, row 2: not a JSON line \('utf-8' "
                                         r"codec can't decode byte 0xe9"):
        rewards.read_preferences(path)
    with pytest.warns(UserWarning, match=r"prefs.jsonl, row 2: .* \(skipped\)"):
        assert len(rewards.read_preferences(path, on_error="skip")) == 2


def test_train_reward_model_says_one_line_for_bad_files(tmp_path, capsys):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"})
                             + "\n" for _ in range(20)))
    not_spm = tmp_path / "bad.model"
    not_spm.write_text("hello")
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text("not json")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for flags, message in (
            (["--tokenizer", str(not_spm)], f"'{not_spm}': not a SentencePiece model"),
            (["--init", str(init)], f"{init / 'config.json'}: not JSON"),
            (["--data", str(tmp_path / "none.jsonl")], "No such file or directory"),
            (["--workdir", str(a_file)], f"--workdir '{a_file}': a file, not a directory")):
        with pytest.raises(SystemExit) as info:
            train_reward_model.main(["--data", str(prefs), "--workdir", str(tmp_path / "rm"),
                                     "--steps", "1", "--batch-size", "8", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and message in err[0], (flags, err)


def _write_prefs(path, n=24, same=0):
    rows = [{"prompt": "the movie was", "chosen": "great fun", "rejected": "dull"}] * (n - same)
    rows += [{"prompt": "the movie was", "chosen": "fine", "rejected": "fine"}] * same
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_train_reward_model_refuses_a_rerun_with_other_arguments_or_data(tmp_path, capsys):
    prefs, rm = tmp_path / "prefs.jsonl", tmp_path / "rm"
    _write_prefs(prefs)
    argv = ["--data", str(prefs), "--workdir", str(rm), "--steps", "2", "--batch-size", "8",
            "--tokenizer-vocab", "30", "--max-len", "8"]
    train_reward_model.main(argv)
    capsys.readouterr()
    before = _listing(rm)
    _write_prefs(prefs, n=30)  # other data under the same name
    for flags, changed in ((["--learning-rate", "0.01"], "--learning-rate (0.001 -> 0.01)"),
                           ([], "--data.sha256 (")):
        with pytest.raises(SystemExit) as info:
            train_reward_model.main([*argv, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {rm} was made with other arguments: ") and \
            changed in err[0] and err[0].endswith("rerun with the recorded values "
                                                  "(arguments.json there), or use a new "
                                                  "--workdir"), err
        assert _listing(rm) == before
    _write_prefs(prefs)  # the recorded data again: more steps and another layout resume
    train_reward_model.main([*argv[:5], "3", *argv[6:], "--remat"])
    assert "resumed from step 2" in capsys.readouterr().out


def test_train_reward_model_says_when_pairs_or_the_model_teach_nothing(tmp_path, capsys,
                                                                      monkeypatch):
    prefs = tmp_path / "prefs.jsonl"
    argv = ["--data", str(prefs), "--steps", "1", "--batch-size", "8", "--tokenizer-vocab",
            "30", "--max-len", "8"]
    _write_prefs(prefs, n=20, same=20)
    with pytest.raises(SystemExit) as info:
        train_reward_model.main([*argv, "--workdir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [
        f"error: {prefs}: need at least 2 preference pairs whose chosen and rejected differ, "
        "found 0 (20 have chosen equal to rejected)"]
    assert not (tmp_path / "a").exists()
    _write_prefs(prefs, n=20, same=5)
    monkeypatch.setattr(rewards, "fit", lambda step, evaluate, state, *a, **k: (
        state, {"accuracy": 0.5, "loss": 0.69}))
    train_reward_model.main([*argv, "--workdir", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"warning: {prefs}: 5 of 20 pairs have chosen equal to rejected and teach nothing; "
        "they are left out",
        "warning: the reward model learned nothing: held-out accuracy 0.500 on 1 pairs is at "
        "or below chance (0.5); more pairs, steps or a higher --learning-rate may help"], err


def test_train_reward_model_is_quiet_on_a_cpu_machine(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    _write_prefs(prefs)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-m", "experiments.train_reward_model", "--data",
                           str(prefs), "--workdir", str(tmp_path / "rm"), "--steps", "1",
                           "--batch-size", "8", "--tokenizer-vocab", "30", "--max-len", "8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("E0000", "INVALID_ARGUMENT", "TPU", "libtpu"):  # libtpu probing for a TPU
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_the_rotten_tomatoes_split_must_make_data(capsys):
    def check(**fields):
        c = get_config("test")
        c.task.name, c.reward.oracle = "rotten_tomatoes", "gold"
        for field, value in fields.items():
            section, key = field.split("__")
            c[section][key] = value
        with pytest.raises(ValueError) as info:
            settings.validate_config(c)
        return str(info.value)

    assert check(task__movie_split=(0.5, 0.3, 0.1, 0.0001)) == (
        "config.task.movie_split = (0.5, 0.3, 0.1, 0.0001): gives the eval part(s) none of "
        "the 508 movies: each share needs at least 0.002")
    assert check(task__movie_split=(0.0005, 0.3, 0.0005, 0.1)).startswith(
        "config.task.movie_split = (0.0005, 0.3, 0.0005, 0.1): gives the sft and rl part(s) "
        "none of the 508 movies")
    assert check(task__prompt_words=1000).startswith(
        "config.task.prompt_words = 1000: half the RL snippets have at most ")
    assert check(task__movie_split=(0.5, 0.3, 0.003, 0.1), rl__batch_size=64).startswith(
        "config.task.movie_split = (0.5, 0.3, 0.003, 0.1): gives the RL part ")


def test_reproduce_checks_its_report_dir_before_the_study(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for report_dir, message in ((a_file, f"--report_dir '{a_file}': a file, not a directory"),
                                (a_file / "below", f"--report_dir '{a_file / 'below'}': a "
                                                   "path below a file")):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.reproduce",
             f"--config={ROOT}/experiments/configs/reproduce.py:smoke",
             f"--workdir={tmp_path / 'w'}", f"--report_dir={report_dir}"],
            cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
            text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: {message}"], proc.stderr[-2000:]
        assert not (tmp_path / "w").exists()


def test_os_errors_are_one_line_with_the_path_and_the_reason():
    assert workdir.os_error_line(OSError(28, "No space left on device", "/w/ckpt")) == (
        "/w/ckpt: No space left on device")
    assert workdir.os_error_line(OSError(30, "Read-only file system")) == (
        "Read-only file system")


def test_a_proxy_at_chance_stops_the_job_unless_the_config_allows_it(tmp_path, monkeypatch,
                                                                    capsys):
    fit = rewards.fit

    def at_chance(*args, **kwargs):
        state, metrics = fit(*args, **kwargs)
        return state, {**metrics, "accuracy": 0.5}

    monkeypatch.setattr(rewards, "fit", at_chance)
    c = get_config("test")
    c.reward.steps = 2
    # On the test variant's few held-out pairs, chance is one warning line.
    (tmp_path / "few").mkdir()
    ingredients.prepare(c, tmp_path / "few")
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "warning: the proxy reward model's held-out accuracy 0.500 is at or below chance, on ")
    c.reward.pairs = 1000  # enough held-out pairs to tell (the oracle ties most)
    with pytest.raises(ValueError, match=r"^the proxy reward model learned nothing: held-out "
                                         r"accuracy 0.500 on \d+ pairs is at or below chance; "
                                         r"raise config.reward.pairs or config.reward.steps, "
                                         r"or rerun with config.reward.allow_chance=True"):
        ingredients.prepare(c, tmp_path)
    assert json.loads((tmp_path / "reward_model.json").read_text())["held_out_accuracy"] == 0.5
    c.reward.allow_chance = True
    assert ingredients.prepare(c, tmp_path).reward_model is not None
