"""The reproduction study's report: `reproduction.md`, one figure per claim (proxy and gold
side by side, bands over seeds) and a copy of `claims.json`, `study.json` and `config.json`,
all generated from what `study.run` wrote to its workdir."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import numpy as np

from warp_jax import evaluation, study

_COLORS = ("tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple")


def write(workdir: pathlib.Path, report_dir: pathlib.Path, command: str) -> pathlib.Path:
    """Writes `report_dir/reproduction.md` and `report_dir/reproduction/` (figures,
    claims.json, study.json, config.json) from the study in `workdir`; returns the markdown's
    path."""
    import matplotlib

    matplotlib.use("Agg")
    run = json.loads((workdir / "study.json").read_text())
    claims = json.loads((workdir / "claims.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    out = report_dir / "reproduction"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("claims.json", "study.json", "config.json"):
        shutil.copyfile(workdir / name, out / name)
    records = run["records"]
    figures = _figures(records, run["geometry"], config, out)
    path = report_dir / "reproduction.md"
    path.write_text(_markdown(run, claims, config, figures, command))
    return path


def _band(ax, curves, label, color, style="-") -> None:
    """The mean over seeds of each seed's upper front on a shared KL grid, +- one standard
    deviation where there are several seeds."""
    curves = [c for c in curves if c]
    if not curves:
        return
    top = min(evaluation.upper_front(c)[-1][0] for c in curves)
    grid = np.linspace(0, top, 40)
    values = np.array([evaluation.front_at(c, grid) for c in curves])
    mean = values.mean(0)
    ax.plot(grid, mean, style, color=color, label=label)
    if len(curves) > 1:
        std = values.std(0, ddof=1)
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)


def _curves(records, reward, seeds, origin, **match):
    return [origin + study.points(records, reward, seed=s, **match) for s in seeds]


def _figures(records, geometry, config, out: pathlib.Path) -> dict[int, str]:
    import matplotlib
    import matplotlib.pyplot as plt

    seeds = range(config["study"]["seeds"])
    sft = next(r for r in records if r["method"] == "sft")
    w = config["warp"]
    names = {}

    def save(fig, name: str, title: str | None = None) -> str:
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        return f"reproduction/{name}.png"

    def pair(claim, draw, title):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        for ax, (name, key) in zip(axes, study.REWARDS.items(), strict=True):
            draw(ax, key, [(0.0, sft[key])])
            ax.set_xlabel("KL(pi || pi_sft), nats per completion")
            ax.set_ylabel(f"{name} reward")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        names[claim] = save(fig, f"claim{claim}",
                            f"Claim {claim}: {title} (mean and std over {len(seeds)} seeds)")

    def anchors(ax, key, origin):
        for anchor, color in (("sft", _COLORS[0]), ("ema", _COLORS[1])):
            _band(ax, _curves(records, key, seeds, origin, method=f"reinforce_{anchor}"),
                  f"REINFORCE, {anchor.upper()} anchor", color)

    pair(1, anchors, "EMA against SFT anchor (upper fronts of the trajectories)")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key in zip(axes, ("proxy_reward", "oracle_reward", "kl"), strict=True):
        for method, color in (("slerp", _COLORS[2]), ("lerp", _COLORS[5])):
            lams = sorted({r["lam"] for r in records if r["method"] == method})
            values = np.array([[next(r[key] for r in records if r["method"] == method and
                                     r["seed"] == s and r["lam"] == lam) for lam in lams]
                               for s in seeds])
            ax.errorbar(lams, values.mean(0), yerr=values.std(0) if len(seeds) > 1 else None,
                        fmt="o-", color=color, capsize=3, label=method.upper())
        ends = np.array([[_last(records, s, run)[key] for run in (0, 1)] for s in seeds])
        ax.errorbar([0, 1], ends.mean(0), yerr=ends.std(0) if len(seeds) > 1 else None,
                    fmt="ks", capsize=3, label="the two runs")
        ax.set_xlabel("lambda")
        ax.set_ylabel({"proxy_reward": "proxy reward", "oracle_reward": "gold reward",
                       "kl": "KL(pi || pi_sft)"}[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    names[2] = save(fig, "claim2",
                    "Claim 2: SLERP against LERP of two runs' task vectors (iteration 1)")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "task_cosine", "task vectors"),
                           (axes[1], "weight_cosine", "full weights")):
        values = [v[key] for pairs in geometry.values() for g in pairs
                  for k, v in g.items() if k != "runs"]
        ax.hist(values, bins=30, color=_COLORS[1])
        ax.set_xlabel(f"cosine between two runs' {label}, per block")
        ax.set_ylabel("blocks x run pairs x seeds")
        ax.grid(alpha=0.3)
    names[3] = save(fig, "claim3", "Claim 3: geometry of iteration 1's runs (the paper's Fig. 11)")

    def liti(ax, key, origin):
        runs = [origin + study.points(records, key, method="warp_run", seed=s, iteration=1,
                                      run=m) for s in seeds for m in range(w["runs"])]
        _band(ax, runs, "iteration 1's RL runs", _COLORS[3], ":")
        _band(ax, _curves(records, key, seeds, origin, method="warp", iteration=1,
                          merged_runs=w["runs"]), "LITI front, iteration 1", _COLORS[4])
        _band(ax, _curves(records, key, seeds, origin, method="warp",
                          iteration=w["iterations"], merged_runs=w["runs"]),
              f"LITI front, iteration {w['iterations']}", _COLORS[4], "--")
        anchors(ax, key, origin)

    pair(4, liti, "LITI fronts against RL trajectories and baselines")

    def merged(ax, key, origin):
        cmap = matplotlib.colormaps["Reds"]
        for m in range(1, w["runs"] + 1):
            _band(ax, _curves(records, key, seeds, origin, method="warp", iteration=1,
                              merged_runs=m), f"M = {m}", cmap(0.3 + 0.7 * m / w["runs"]))

    pair(5, merged, "LITI fronts of the SLERP of M runs (iteration 1)")

    def iterations(ax, key, origin):
        cmap = matplotlib.colormaps["Blues"]
        for i in range(1, w["iterations"] + 1):
            _band(ax, _curves(records, key, seeds, origin, method="warp", iteration=i,
                              merged_runs=w["runs"]), f"iteration {i}",
                  cmap(0.3 + 0.7 * i / w["iterations"]))

    pair(6, iterations, "LITI fronts of each WARP iteration")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, color in (("reinforce_sft", _COLORS[0]), ("reinforce_ema", _COLORS[1]),
                          ("warp_run", _COLORS[3]), ("warp", _COLORS[4])):
        pts = [(r["kl"], r["rank_correlation"]) for r in records
               if r["method"] == method and r["rank_correlation"] is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, color=color, label=method, alpha=0.6)
    if sft["rank_correlation"] is not None:
        ax.axhline(sft["rank_correlation"], color="k", lw=0.8, label="SFT policy")
    ax.set_xlabel("KL(pi || pi_sft)")
    ax.set_ylabel("Spearman(proxy, gold) of a policy's samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names[0] = save(fig, "rank_correlation")
    return names


def _last(records, seed, run):
    """Seed `seed`'s iteration-1 run `run` at its last evaluation."""
    return max((r for r in records if r["method"] == "warp_run" and r["iteration"] == 1
                and r["seed"] == seed and r["run"] == run), key=lambda r: r["step"])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=pathlib.Path(__file__).parent
                              ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(x) -> str:
    if x is None:  # a statistic that is undefined (NaN) in the run
        return "n/a"
    if isinstance(x, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in x.items())
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return f"{x:+.3f}" if isinstance(x, float) else str(x)


def _p(x) -> str:
    """A claim's p-value, or its p-value per effect; blank for a claim without a test."""
    if isinstance(x, dict):
        return ", ".join(f"{k} {_p(v) or 'n/a'}" for k, v in x.items())
    return "" if x is None else f"{x:.3f}"


def _per_seed(values) -> str:
    return "<br>".join(f"seed {s}: {_fmt(v)}" for s, v in enumerate(values))


def _hacking(records) -> list[str]:
    """The proxy-gold rank correlation of the evaluated RL policies, by KL band."""
    bands = ((0, 5), (5, 20), (20, float("inf")))
    rows = ["| KL(pi &#124;&#124; pi_sft) | policies | mean Spearman(proxy, gold) |",
            "|---|---:|---:|"]
    for low, high in bands:
        values = [r["rank_correlation"] for r in records if r["method"] != "sft"
                  and r["rank_correlation"] is not None and low <= r["kl"] < high]
        if values:
            rows.append(f"| {low:g} to {high:g} | {len(values)} | {np.mean(values):+.3f} |")
    return rows


def _markdown(run, claims, config, figures, command) -> str:
    c, meta, machine = config, run["setup"], run["machine"]
    records = run["records"]
    minutes = sum(run["wall_seconds"]) / 60
    invocations = len(run["wall_seconds"])
    resumed = (f", summed over the {invocations} invocations that computed part of it (a "
               "rerun resumes from the workdir)")
    lines = [
        "# Reproducing WARP's observations at small scale", "",
        f"Generated by `{command}` at commit `{_commit()}` on {machine['platform']} "
        f"({machine['cpus']} CPU cores, JAX on {machine['backend']} with "
        f"{machine['devices']} device(s)); wall time {minutes:.0f} minutes"
        f"{resumed if invocations > 1 else ''}. "
        "Every number below is in `reproduction/claims.json`, `reproduction/study.json` or "
        "`reproduction/config.json`.", "",
        "## Running it", "",
        "```bash",
        "python -m experiments.reproduce --config=experiments/configs/reproduce.py:full "
        "--workdir=W --report_dir=docs",
        "```", "",
        "Variants: `full` (this report) and `smoke` (2 seeds of a tiny model, a few minutes: "
        "what the tests run); any field is overridable (`--config.study.seeds=5`), and a bad "
        "value stops it with one line. Killed and rerun with the same workdir, it resumes "
        "where it stopped (every run and evaluation is checkpointed, as in the main job); a "
        "finished study only judges the claims again and rewrites the report. `W/claims.json` "
        "holds each claim's verdict on both rewards (`claim`, `title`, `verdict`, `rule`, "
        "`seeds`, `per_seed`, `reward`, p-values), `W/study.json` every evaluated point, the "
        "task-vector geometry and the set-up.", "",
        "## Setup", "",
        f"- **Text**: {meta['snippets']} real Rotten Tomatoes critic snippets "
        "(`warp_jax.data.rotten_tomatoes`), split by movie into SFT text "
        f"({meta['split']['sft']} snippets), gold-classifier text ({meta['split']['gold']}), "
        f"RL prompts ({meta['train_prompts']} openings of {c['task']['prompt_words']} words) and "
        f"evaluation prompts ({meta['eval_prompts']} openings): no movie and no snippet is in "
        "two parts.",
        f"- **Policy**: a Gemma of {meta['parameters'] / 1e6:.2f}M parameters "
        f"({c['model']['overrides']['num_layers']} layers, width "
        f"{c['model']['overrides']['embed_dim']}, a {meta['vocab_size']}-piece SentencePiece "
        f"vocabulary trained on the SFT text), {c['sft']['steps']} SFT steps.",
        f"- **Gold reward**: P(fresh) from a TF-IDF logistic regression fitted on the real "
        f"fresh/rotten labels of the gold part; accuracy {meta['gold']['held_out_accuracy']:.3f} "
        f"on a held-out tenth of it. A classifier of critics' own labels, rather than a "
        "lexicon (VADER), because it measures what the labels mean on this text, and it shares "
        "nothing with the proxy but the text it scores.",
        f"- **Proxy reward**: a Gemma Bradley-Terry model (initialised from the SFT policy) "
        f"trained on {meta['reward_model']['pairs']} pairs of SFT completions ranked by the gold "
        f"reward, pair accuracy {meta['reward_model']['held_out_accuracy']:.3f} on "
        f"{meta['reward_model']['held_out_pairs']} held-out pairs; standardised to mean 0 and "
        f"std 1 on {meta['reward_model']['norm_samples']} SFT completions (raw mean "
        f"{meta['reward_model']['mean']:.3f}, std {meta['reward_model']['std']:.3f}).",
        f"- **RL**: REINFORCE with RLOO (K = {c['rl']['num_samples']}), "
        f"{c['rl']['batch_size']} prompts a step, Adam lr {c['rl']['learning_rate']:g} after "
        f"{c['rl']['warmup_steps']} warm-up steps, temperature {c['rl']['temperature']}, "
        f"{c['rl']['max_new_tokens']} new tokens, EMA rate mu {c['rl']['mu']}, beta "
        f"{run['beta']:g} (the pilot's). WARP: I = {c['warp']['iterations']} iterations of "
        f"M = {c['warp']['runs']} runs of T = {c['warp']['steps']} steps, LITI eta "
        f"{c['warp']['eta']} between iterations; baselines run I x T steps. "
        f"{c['study']['seeds']} RL seeds (prompt order and sampling keys).",
        f"- **Evaluation**: {meta['eval_prompts']} held-out prompts x {c['eval']['samples']} "
        f"samples, every {c['eval']['every']} steps; KL is the Monte-Carlo KL(pi || pi_sft) "
        f"per completion. The SFT policy scores {run['records'][0]['proxy_reward']:+.3f} proxy and "
        f"{run['records'][0]['oracle_reward']:.3f} gold.", "",
    ]
    pilot = [r for r in records if r["method"] == "pilot"]
    if pilot:
        lines += ["## Pilot", "",
                  f"SFT-anchored REINFORCE for {c['study']['pilot_steps']} steps at each beta; "
                  "the study takes the smallest beta whose KL term binds: at the end of its "
                  f"run, beta x KL is at least {c['study']['bind']:g} x the proxy reward gained "
                  "over the SFT policy (the last column). Chosen: "
                  f"**beta = {run['beta']:g}**.", "",
                  "| beta | step | KL | proxy | gold | Spearman(proxy, gold) | beta x KL / "
                  "proxy gain |", "|---:|---:|---:|---:|---:|---:|---:|"]
        sft_proxy = records[0]["proxy_reward"]
        for r in sorted(pilot, key=lambda r: (r["beta"], r["step"])):
            gain = r["proxy_reward"] - sft_proxy
            ratio = f"{r['beta'] * r['kl'] / gain:.2f}" if gain > 0 else "(no gain)"
            lines.append(f"| {r['beta']:g} | {r['step']} | {r['kl']:.3f} | "
                         f"{r['proxy_reward']:+.3f} | {r['oracle_reward']:.3f} | "
                         f"{_fmt(r['rank_correlation'])} | {ratio} |")
        lines.append("")
    by = {(x["claim"], x["reward"]): x for x in claims}
    lines += ["## Verdicts", "", "| claim | proxy reward | gold reward |", "|---|---|---|"]
    for k, title in study.CLAIMS.items():
        lines.append(f"| {k}. {title} | {by[k, 'proxy']['verdict']} | "
                     f"{by[k, 'gold']['verdict']} |")
    lines += ["", "Rules, fixed before the run: an effect measured once per seed is "
              "*supported* if it is > 0 in every seed and a one-sided t-test over seeds gives "
              f"p < {c['study']['alpha']}, *not supported* if its mean is <= 0, else "
              "*inconclusive*. Fronts are upper envelopes of evaluations, read at "
              f"{', '.join(f'{x:g}' for x in c['study']['levels'])} x the KL that both "
              "compared curves reach.", ""]
    for k, title in study.CLAIMS.items():
        lines += [f"## Claim {k}: {title}", "", f"Rule: {study.RULES[k]}.", "",
                  "| reward | verdict | per seed | p |", "|---|---|---|---|"]
        for name in study.REWARDS:
            x = by[k, name]
            lines.append(f"| {name} | {x['verdict']} | {_per_seed(x['per_seed'])} | "
                         f"{_p(x.get('p_value'))} |")
        lines += ["", f"![claim {k}]({figures[k]})", ""]
    lines += ["## Reward hacking", "",
              "The Spearman correlation between proxy and gold scores of a policy's samples "
              f"is {_fmt(records[0]['rank_correlation'])} for the SFT policy; the figure shows it "
              "for every evaluated policy against its KL.", "", *_hacking(records), "",
              f"![rank correlation]({figures[0]})", "",
              "## What differs from the paper", "",
              f"- Scale: a {meta['parameters'] / 1e6:.1f}M-parameter Gemma completing "
              f"{c['rl']['max_new_tokens']} tokens of a review, not Gemma 7B answering "
              f"conversations in 300; T = {c['warp']['steps']} steps, not 9k; "
              f"{c['rl']['batch_size']} prompts a step, not 128.",
              "- Rewards: the paper optimises a large reward model and reports it alone; here "
              "a small proxy trained on gold-ranked pairs, and the gold reward beside it.",
              f"- The learning rate ({c['rl']['learning_rate']:g}, Adam) and the EMA rate (mu "
              f"= {c['rl']['mu']:g}) are scaled to runs of {c['warp']['steps']} steps (the "
              "paper: 1e-6 and 0.01 over 9k); beta comes from the pilot.",
              f"- M = {c['warp']['runs']} runs and I = {c['warp']['iterations']} iterations "
              "(the paper: M = 2 by default, up to 5; I = 5). The batch, M, I, T and the "
              "learning rate are fixed in advance (T and the rate so that the study fits in "
              "about an hour on 2 CPU cores); only beta is piloted.", ""]
    return "\n".join(lines)
