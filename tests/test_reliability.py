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
from warp_jax import data, rewards, workdir
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
    with pytest.raises(ValueError, match=r"prefs.jsonl:2: malformed preference pair: 'utf-8' "
                                         r"codec can't decode byte 0xe9"):
        rewards.read_preferences(path)
    with pytest.warns(UserWarning, match=r"prefs.jsonl:2: .* \(skipped\)"):
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
