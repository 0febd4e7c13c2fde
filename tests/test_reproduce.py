"""The reproduction study (warp_jax.study): the smoke study end to end, resuming, its data
split, and the decision rules against brute force and hand-made records."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import gemma_warp
from experiments.configs.reproduce import get_config
from warp_jax import claims, data, ingredients, settings, study, study_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERDICTS = {"supported", "refuted", "inconclusive", "untestable"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    claims = study.run(get_config("smoke"), workdir)
    return workdir, claims


@pytest.mark.slow
def test_the_smoke_study_judges_all_six_claims_on_both_rewards(smoke, tmp_path):
    workdir, claims = smoke
    assert json.loads((workdir / "claims.json").read_text()) == claims
    assert sorted((c["claim"], c["reward"]) for c in claims) == sorted(
        (k, r) for k in range(1, 7) for r in ("proxy", "gold"))
    for c in claims:
        assert c["verdict"] in VERDICTS and c["rule"] == study.RULES[c["claim"]]
        assert c["seeds"] == 2 and len(c["per_seed"]) == 2
        assert c["verdict"] != "inconclusive" or "seeds_needed" in c
        for e in c["effects"]:
            assert e["verdict"] in VERDICTS - {"untestable"} and len(e["per_seed"]) == 2
    run = json.loads((workdir / "study.json").read_text())
    records = run["records"]
    assert run["setup"]["sft_betas"] == [0.0, 0.1]
    assert run["setup"]["reward_model"]["held_out_accuracy"] == run["setup"]["gate"][
        "held_out_accuracy"]
    assert {r["seed"] for r in records if r["method"] == "warp_run"} == {0, 1}
    assert {tuple(r["runs"]) for r in records if r["method"] == "warp"} == {
        (0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)}
    assert {r["iteration"] for r in records if r["method"] == "warp"} == {1, 2, 3}
    assert {(r["seed"], r["beta"]) for r in records if r["method"] == "sft_anchor"} == {
        (s, b) for s in (0, 1) for b in (0.0, 0.1)}
    steps = {r["method"]: r["step"] for r in records if r["method"].startswith("reinforce")}
    assert steps == {"reinforce_sft": 16, "reinforce_ema": 16}  # M x T
    assert {r["method"] for r in records} >= {"warp_run_ema", "control", "slerp", "lerp"}
    assert all(r["rank_correlation"] is not None or r["kl"] == 0 for r in records)
    report = study_report.write(workdir, tmp_path, command="python -m experiments.reproduce")
    text = report.read_text()
    for k in range(1, 7):
        assert f"![claim {k}](reproduction/claim{k}.png)" in text
        assert (tmp_path / "reproduction" / f"claim{k}.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "reproduction" / "claims.json").read_text()) == claims


@pytest.mark.slow
def test_a_study_resumes_from_what_its_workdir_holds(smoke, tmp_path, capfd):
    workdir = tmp_path / "w"
    shutil.copytree(smoke[0], workdir)
    for name in ("claims.json", "study.json"):
        (workdir / name).unlink()  # killed before these were written
    # Records that are JSON but not what their stage wrote are redone, each with a warning.
    front = workdir / "records/seed1_iter2_front.json"
    front.write_text(json.dumps(json.loads(front.read_text())[:1]))
    (workdir / "records/seed0_slerp_lambda0.5.json").write_text('{"oops": 1}')
    (workdir / "records/seed0_lerp_lambda0.5.json").write_text('[{"method": "lerp"}]')
    first = json.loads((workdir / "wall_time.json").read_text())

    def killed(self):
        raise KeyboardInterrupt  # after the last record, before the outputs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study.Study, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            study.run(get_config("smoke"), workdir)
    warnings = [line for line in capfd.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    assert warnings == [
        f"warning: {workdir}/records/seed0_slerp_lambda0.5.json is not a list of records; "
        "evaluating seed0_slerp_lambda0.5 again",
        f"warning: {workdir}/records/seed0_lerp_lambda0.5.json is incomplete (record 0 lacks "
        "run, step, eta, kl, proxy_reward, oracle_reward); evaluating seed0_lerp_lambda0.5 "
        "again",
        f"warning: {front} is incomplete (records missing); evaluating seed1_iter2_front "
        "again"], warnings
    spent = json.loads((workdir / "wall_time.json").read_text())
    assert spent[:-1] == first and spent[-1] > 0  # the killed invocation's time counts
    assert study.run(get_config("smoke"), workdir) == smoke[1]
    # That rerun only wrote the outputs: it adds no time.
    assert json.loads((workdir / "wall_time.json").read_text()) == spent


def test_bad_study_fields_are_one_line_naming_them():
    for field, value, match in (("warp.runs", 1, "config.warp.runs = 1: the study merges"),
                                ("warp.iterations", 1, "config.warp.iterations = 1"),
                                ("study.lambdas", (0.5, 1.0), "config.study.lambdas"),
                                ("study.sft_betas", (), "config.study.sft_betas"),
                                ("study.kl_levels", (0.0, 1.0), "config.study.kl_levels"),
                                ("study.gate_accuracy", 1.5, "config.study.gate_accuracy"),
                                ("reward.oracle", "", "config.reward.oracle = '': the study"),
                                ("study.seeds", 0, "config.study.seeds = 0"),
                                ("study.seeds", 1, r"config.study.seeds = 1: must be an int >= "
                                                   r"2: a verdict needs the spread over seeds")):
        c = get_config("smoke")
        section, key = field.split(".")
        c[section][key] = value
        with pytest.raises(ValueError, match=match):
            study.validate(c)
    c = get_config("smoke")
    c.study.sesoi.log_kl = 0.0
    with pytest.raises(ValueError, match=r"config\.study\.sesoi = .*smallest effect of interest"):
        study.validate(c)
    study.validate(get_config("full"))
    c = gemma_warp.get_config("test")
    c.reward.oracle = "gold"
    with pytest.raises(ValueError, match="use it with task 'rotten_tomatoes'"):
        settings.validate_config(c)
    c = get_config("smoke")
    c.reward.oracle = "vader"
    with pytest.raises(ValueError, match=r"config\.reward\.labels = 'soft': soft labels"):
        settings.validate_config(c)


@pytest.mark.parametrize("fields, want", [
    ({"pooling": "max"}, "config.reward.pooling = 'max': use 'last' or 'mean'"),
    ({"pair_temperature": 0.0}, "config.reward.pair_temperature = 0.0: must be > 0"),
    ({"patience": -1}, "config.reward.patience = -1: must be an int >= 0"),
    ({"warmup_steps": 2000}, "config.reward.warmup_steps = 2000: must be below reward.steps "
     "(2000)"),
    ({"eval_every": 0}, "config.reward.patience = 4: early stopping needs held-out "
     "evaluations: set reward.eval_every"),
])
def test_bad_reward_model_options_are_one_line(fields, want):
    c = get_config("full")
    c.reward.update(fields)
    with pytest.raises(ValueError) as info:
        settings.validate_config(c, files=False)
    assert str(info.value) == want


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce",
         f"--config={ROOT}/experiments/configs/reproduce.py:smoke", "--config.warp.runs=1",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert (out.returncode, out.stderr.strip().splitlines()) == (
        2, ["error: config.warp.runs = 1: the study merges and compares runs: use 2 or more"])
    assert not list(tmp_path.iterdir())  # nothing written


def test_evaluation_prompts_share_no_snippet_no_movie_and_no_opening_with_training():
    c = get_config("full")
    texts = ingredients._texts(c)
    parts = texts.parts
    assert len(texts.eval_prompts) == c.task.eval_prompts
    eval_movies = {s.movie for s in parts["eval"]}
    for other in ("sft", "gold", "rl"):
        assert not eval_movies & {s.movie for s in parts[other]}
        assert not {s.text for s in parts["eval"]} & {s.text for s in parts[other]}
    assert set(texts.corpus) == {s.text for s in parts["sft"]}
    openings = {name: {data.opening(s.text, c.task.prompt_words) for s in part}
                for name, part in parts.items()}
    assert set(texts.eval_prompts) <= openings["eval"]
    assert not set(texts.eval_prompts) & (openings["sft"] | openings["rl"])
    assert set(texts.train_prompts) <= openings["rl"]
    assert len(texts.train_prompts) > 1000


def _records(gain=0.2, seeds=6, iteration_gains=(0.2, 0.2, 0.0), spread=0.05):
    """Hand-made study records of `seeds` seeds in which every effect of every claim is
    `gain` (or, with a negative `gain`, of the other sign) on both rewards, each seed's
    `spread` x `gain` larger than the last (a verdict needs a spread over seeds), and the
    iterations gain `iteration_gains` one after the other."""
    c = get_config("full")
    runs, etas = c.warp.runs, c.warp.eta_grid
    records = [{"method": "sft", "seed": None, "kl": 0.0, "proxy_reward": 0.0,
                "oracle_reward": 0.0}]

    def point(reward, kl, **fields):
        return {**fields, "kl": kl, "proxy_reward": reward, "oracle_reward": reward}

    def base(kl):  # a concave trajectory in KL
        return 0.3 * np.log1p(kl)

    for s in range(seeds):
        g = gain * (1 + spread * s)
        for beta in c.study.sft_betas:  # reaches KL 4
            records += [point(base(k), k, seed=s, method="sft_anchor", beta=beta, step=k)
                        for k in (0.5, 1.0, 2.0, 4.0)]
        for m in range(runs):
            for k in (0.5, 1.0, 2.0, 4.0, 8.0):
                records.append(point(base(k) + g, k, seed=s, method="warp_run", iteration=1,
                                     run=m, step=int(8 * k)))
                records.append(point(base(k) + 2 * g, k / 2, seed=s, method="warp_run_ema",
                                     iteration=1, run=m, step=int(8 * k)))
        end = base(8.0) + g  # the runs' last evaluation, at KL 8
        for lam in c.study.lambdas:
            records += [point(end + g, 8.0 * np.exp(g), seed=s, method="slerp", lam=lam),
                        point(end - g, 8.0 * np.exp(-g), seed=s, method="lerp", lam=lam)]

        def front(lift, method="warp", s=s, **fields):  # concave in eta, KL ~ eta
            return [point(base(16.0 * eta) + lift * eta**0.1, 16.0 * eta, seed=s,
                          method=method, eta=eta, **fields) for eta in etas if eta > 0]

        for subset in claims.subsets(runs):  # lifted by g per run merged beyond the first
            records += front(g * (len(subset) - 1), iteration=1, runs=list(subset))
        lift = g * (runs - 1)
        for i, step_gain in enumerate(iteration_gains, start=2):
            lift += step_gain * (1 + 0.05 * s)
            records += front(lift, iteration=i, runs=list(range(runs)))
        records += front(g * (runs - 2), "control")
        for anchor in ("sft", "ema"):
            records += [point(base(k), k, seed=s, method=f"reinforce_{anchor}", step=k)
                        for k in (1.0, 4.0, 16.0)]
    cosine = 0.2 - gain / 2
    geometry = {str(s): [{"runs": [0, 1], "block_0": {
        "task_cosine": cosine * (1 + 0.05 * s), "weight_cosine": 0.99 + gain / 20}}]
        for s in range(seeds)}
    return records, geometry


def _verdicts(records, geometry, seeds=6):
    c = get_config("full")
    judged = claims.judge(records, geometry, c.study, seeds)
    for x in judged:
        assert x["verdict"] in VERDICTS
        assert x["verdict"] == "inconclusive" or x["seeds_needed"] is None, x
    return {(x["claim"], x["reward"]): x["verdict"] for x in judged}


def test_the_claims_follow_the_effects_in_hand_made_records():
    assert set(_verdicts(*_records()).values()) == {"supported"}
    flipped = _verdicts(*_records(gain=-0.2, iteration_gains=(-0.2, -0.2, 0.5)))
    for claim in range(1, 7):
        assert flipped[claim, "gold"] == flipped[claim, "proxy"] == "refuted", claim
    # An iteration that still gains a lot has not saturated: claim 6 is refuted too.
    assert _verdicts(*_records(iteration_gains=(0.2, 0.2, 0.5)))[6, "proxy"] == "refuted"
    # Two seeds of a noisy effect decide nothing, and say how many would.
    records, geometry = _records(seeds=2, spread=1.5)
    c = get_config("full")
    noisy = [x for x in claims.judge(records, geometry, c.study, 2)
             if x["verdict"] == "inconclusive"]
    assert noisy and all(x["seeds_needed"] is None or x["seeds_needed"] > 2 for x in noisy)


def test_the_gate_reads_the_proxys_record_against_the_configs_bounds(tmp_path):
    c = get_config("full")
    record = {"held_out_accuracy": 0.80, "sft_spearman": 0.65}
    (tmp_path / "reward_model.json").write_text(json.dumps(record))
    gate = study.gate(tmp_path, c.study)
    assert not gate["passed"]
    assert gate["reason"] == "Spearman(proxy, gold) on SFT samples 0.650 < 0.7"
    (tmp_path / "reward_model.json").write_text(json.dumps({**record, "sft_spearman": 0.71}))
    assert study.gate(tmp_path, c.study)["passed"]
    # a proxy without a gold correlation (no oracle scored its samples) does not pass
    (tmp_path / "reward_model.json").write_text(json.dumps({"held_out_accuracy": 0.9}))
    assert "Spearman" in study.gate(tmp_path, c.study)["reason"]


def test_below_the_gate_every_gold_verdict_is_untestable():
    records, geometry = _records()
    c = get_config("full")
    gate = {"passed": False, "reason": "held-out pair accuracy 0.600 < 0.75"}
    judged = claims.judge(records, geometry, c.study, 6, gate)
    assert {x["verdict"] for x in judged if x["reward"] == "gold"} == {"untestable"}
    assert {x["verdict"] for x in judged if x["reward"] == "proxy"} == {"supported"}
