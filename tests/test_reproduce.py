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
from warp_jax import data, ingredients, settings, study, study_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERDICTS = {"supported", "not supported", "inconclusive"}


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
    records = json.loads((workdir / "study.json").read_text())["records"]
    assert {r["seed"] for r in records if r["method"] == "warp_run"} == {0, 1}
    assert {r["merged_runs"] for r in records if r["method"] == "warp"} == {1, 2, 3}
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
                                ("study.lambdas", (0.5, 1.0), "config.study.lambdas"),
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
    c.warp = {**c.warp.to_dict(), "baseline_runs": 5}  # a config without the shared field
    with pytest.raises(ValueError, match=r"once per seed: use study\.seeds"):
        study.validate(c)
    study.validate(get_config("full"))
    c = gemma_warp.get_config("test")
    c.reward.oracle = "gold"
    with pytest.raises(ValueError, match="use it with task 'rotten_tomatoes'"):
        settings.validate_config(c)


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


def test_an_effect_is_supported_only_if_every_seed_and_the_test_agree():
    assert study.effect([0.3, 0.31, 0.29], 0.05)[0] == "supported"
    verdict, p = study.effect([0.3, 0.01, 0.6], 0.05)  # all > 0, but too noisy for 3 seeds
    assert verdict == "inconclusive" and p > 0.05
    assert study.effect([0.3, -0.01, 0.4], 0.05)[0] == "inconclusive"
    assert study.effect([-0.3, 0.1, 0.1], 0.05)[0] == "not supported"
    assert study.effect([0.2, float("nan")], 0.05)[0] == "inconclusive"
    # No test without a spread: one seed, or seeds that agree exactly, are never p = 0.
    for x in ([0.4], [0.4, 0.4, 0.4], [-0.2, -0.2], []):
        verdict, p = study.effect(x, 0.05)
        assert verdict == "inconclusive" and np.isnan(p), (x, verdict, p)
    import scipy.stats

    x = [0.2, 0.5, 0.1]
    assert study.effect(x, 0.05)[1] == pytest.approx(
        scipy.stats.t.sf(np.mean(x) / (np.std(x, ddof=1) / np.sqrt(3)), df=2))


def test_the_pilot_takes_the_smallest_beta_whose_kl_term_binds():
    def run(beta, kl, reward):
        return [{"beta": beta, "step": 50, "kl": kl / 2, "proxy_reward": reward / 2},
                {"beta": beta, "step": 100, "kl": kl, "proxy_reward": reward}]

    pilot = run(0.03, 10.0, 1.0) + run(0.1, 4.5, 0.7) + run(0.3, 2.4, 0.4)
    assert study.pick_beta(pilot, 0.0, 0.5) == 0.1  # 0.45 >= 0.35; 0.03 x 10 < 0.5
    assert study.pick_beta(pilot, 0.0, 0.2) == 0.03
    assert study.pick_beta(pilot, -1.0, 0.5) == 0.3  # none binds: the largest


def _records(ema_gain=0.2, slerp_gain=0.1, m_gain=0.1, iteration_gains=(0.2, 0.05),
             seeds=3):
    """Hand-made study records of `seeds` seeds with the given effects (on both rewards),
    each 1% larger per seed: a verdict needs a spread over seeds."""
    records = [{"method": "sft", "kl": 0.0, "proxy_reward": 0.0, "oracle_reward": 0.0}]

    def point(reward, **fields):
        return {**fields, "proxy_reward": reward, "oracle_reward": reward}

    for s in range(seeds):
        jitter = 0.01 * s
        for anchor, gain in (("sft", 0.0), ("ema", ema_gain * (1 + jitter))):
            records += [point(k * (0.3 + gain + jitter) - 0.2 * max(k - 2, 0), kl=k, seed=s,
                              method=f"reinforce_{anchor}", step=k) for k in (1.0, 2.0, 3.0)]
        def base(k, m, jitter=jitter):
            return 0.4 * k * (1 + m_gain * (1 + jitter) * (m - 1)) + jitter

        records += [point(base(k, m), kl=k, seed=s, method="warp", iteration=1, merged_runs=m)
                    for m in range(1, 4) for k in (1.0, 2.0)]
        for i in range(2, len(iteration_gains) + 2):
            scale = 1 + sum(iteration_gains[:i - 1])
            records += [point(base(k, 3) * scale, kl=k, seed=s, method="warp", iteration=i,
                              merged_runs=3) for k in (1.0, 2.0)]
        records += [point(0.3 * k, kl=k, seed=s, method="warp_run", iteration=1, run=m,
                          step=k) for m in range(3) for k in (1.0, 2.0)]
        for lam in (0.25, 0.5, 0.75):
            records += [point(0.5 + slerp_gain + jitter, kl=1.0 + slerp_gain * (1 + jitter), seed=s,
                              method="slerp", lam=lam),
                        point(0.5, kl=1.0, seed=s, method="lerp", lam=lam)]
    geometry = {str(s): [{"runs": [0, 1], "block_0": {"task_cosine": 0.05 + jitter,
                                                      "weight_cosine": 0.999}}]
                for s in range(seeds)}
    return records, geometry


def _verdicts(records, geometry, seeds=3):
    c = get_config("full")
    return {(x["claim"], x["reward"]): x["verdict"]
            for x in study.judge(records, geometry, c.study, seeds)}


def test_the_claims_follow_the_effects_in_hand_made_records():
    verdicts = _verdicts(*_records())
    assert set(verdicts.values()) == {"supported"}
    flipped = _verdicts(*_records(ema_gain=-0.2, slerp_gain=-0.1, m_gain=-0.1,
                                  iteration_gains=(-0.1, 0.0)))
    for claim in (1, 2, 5, 6):
        assert flipped[claim, "gold"] == flipped[claim, "proxy"] == "not supported", claim
    records, geometry = _records(iteration_gains=(0.1, 0.2))  # no saturation
    assert _verdicts(records, geometry)[6, "proxy"] == "inconclusive"
    geometry["1"][0]["block_0"]["task_cosine"] = 0.3  # one seed's runs are not orthogonal
    assert _verdicts(records, geometry)[3, "gold"] == "inconclusive"
    geometry["1"][0]["block_0"]["task_cosine"] = -0.9  # nor on average
    assert _verdicts(records, geometry)[3, "gold"] == "not supported"
