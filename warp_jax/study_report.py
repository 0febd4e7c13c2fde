"""The reproduction study's report: `reproduction.md`, one figure per claim (proxy and gold
side by side, bands over seeds) and a copy of `claims.json`, `study.json` and `config.json`,
all generated from what `study.run` wrote to its workdir. The rules and the smallest
effects of interest come first, then the proxy's gate, then the verdicts."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import numpy as np

from warp_jax import claims as claims_lib
from warp_jax import evaluation

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
    figures = _figures(run["records"], run["geometry"], config, out)
    path = report_dir / "reproduction.md"
    path.write_text(_markdown(run, claims, config, figures, command))
    return path


def _band(ax, curves, label, color, style="-") -> None:
    """The mean over seeds of each seed's upper front on a shared KL grid (in log KL, up to
    the shortest reach), +- one standard deviation where there are several seeds."""
    curves = [c for c in curves if len(c) > 1]
    if not curves:
        return
    top = min(evaluation.reach(c) for c in curves)
    if top <= 0:
        return
    grid = np.geomspace(top / 100, top, 40)
    values = np.array([evaluation.front_at(c, grid) for c in curves])
    mean = values.mean(0)
    ax.plot(grid, mean, style, color=color, label=label)
    if len(curves) > 1:
        std = values.std(0, ddof=1)
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)


def _figures(records, geometry, config, out: pathlib.Path) -> dict[int, str]:
    import matplotlib
    import matplotlib.pyplot as plt

    seeds = range(config["study"]["seeds"])
    sft = next(r for r in records if r["method"] == "sft")
    w = config["warp"]
    runs = list(range(w["runs"]))
    names = {}

    def curves(key, per_run=False, **fields):
        origin = [(0.0, sft[key])]
        if per_run:
            return [origin + claims_lib.points(records, key, seed=s, run=m, **fields)
                    for s in seeds for m in runs]
        return [origin + claims_lib.points(records, key, seed=s, **fields) for s in seeds]

    def save(fig, name: str, title: str | None = None) -> str:
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        return f"reproduction/{name}.png"

    def pair(claim, draw, title):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        for ax, (name, key) in zip(axes, claims_lib.REWARDS.items(), strict=True):
            draw(ax, key)
            ax.set_xscale("log")
            ax.set_xlabel("KL(pi || pi_sft), nats per completion (log scale)")
            ax.set_ylabel(f"{name} reward")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        names[claim] = save(fig, f"claim{claim}",
                            f"Claim {claim}: {title} (mean and std over {len(seeds)} seeds)")

    def anchors(ax, key):
        cmap = matplotlib.colormaps["Greys"]
        betas = config["study"]["sft_betas"]
        for i, beta in enumerate(betas):
            _band(ax, curves(key, method="sft_anchor", beta=beta),
                  f"SFT anchor, beta {beta:g}", cmap(0.35 + 0.65 * i / max(1, len(betas) - 1)))
        _band(ax, curves(key, True, method="warp_run", iteration=1),
              f"EMA anchor, beta {config['rl']['beta']:g}", _COLORS[1])
        _band(ax, curves(key, True, method="warp_run_ema", iteration=1),
              "its EMA weights (Fig. 14)", _COLORS[1], "--")

    pair(1, anchors, f"EMA against SFT anchors, {w['steps']} steps")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lams = config["study"]["lambdas"]
    for ax, key in zip(axes, ("proxy_reward", "oracle_reward", "kl"), strict=True):
        for method, color in (("slerp", _COLORS[2]), ("lerp", _COLORS[5])):
            values = np.array([[claims_lib.match(records, method=method, seed=s, lam=lam)[0][key]
                                for lam in lams] for s in seeds])
            ax.errorbar(lams, values.mean(0), yerr=values.std(0) if len(seeds) > 1 else None,
                        fmt="o-", color=color, capsize=3, label=method.upper())
        ends = np.array([[_last(records, s, run)[key] for run in (0, 1)] for s in seeds])
        ax.errorbar([0, 1], ends.mean(0), yerr=ends.std(0) if len(seeds) > 1 else None,
                    fmt="ks", capsize=3, label="the two runs")
        ax.plot([0, 1], ends.mean(0), "k:", lw=0.8)
        ax.set_xlabel("lambda")
        ax.set_ylabel({"proxy_reward": "proxy reward", "oracle_reward": "gold reward",
                       "kl": "KL(pi || pi_sft)"}[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    names[2] = save(fig, "claim2",
                    "Claim 2: SLERP and LERP of two runs' task vectors against the runs")

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

    every = list(runs)

    def liti(ax, key):
        _band(ax, curves(key, True, method="warp_run", iteration=1), "iteration 1's RL runs",
              _COLORS[3], ":")
        _band(ax, curves(key, method="warp", iteration=1, runs=every),
              f"LITI front, iteration 1 ({w['runs']} x {w['steps']} run-steps)", _COLORS[4])
        for anchor, color in (("sft", _COLORS[0]), ("ema", _COLORS[1])):
            _band(ax, curves(key, method=f"reinforce_{anchor}"),
                  f"REINFORCE, {anchor.upper()} anchor, {w['runs'] * w['steps']} steps", color)

    pair(4, liti, "LITI front against its runs and compute-matched baselines")

    def merged(ax, key):
        cmap = matplotlib.colormaps["Reds"]
        subsets = claims_lib.subsets(w["runs"])
        for size in sorted({len(x) for x in subsets}):
            group = [list(x) for x in subsets if len(x) == size]
            _band(ax, [c for x in group for c in curves(key, method="warp", iteration=1,
                                                         runs=x)],
                  f"M = {size}", cmap(0.3 + 0.7 * size / w["runs"]))
        _band(ax, curves(key, method="control"),
              f"LITI of one run of {w['runs'] * w['steps']} steps", _COLORS[0], "--")

    pair(5, merged, "LITI fronts of the SLERP of M runs (iteration 1)")

    def iterations(ax, key):
        cmap = matplotlib.colormaps["Blues"]
        for i in range(1, w["iterations"] + 1):
            _band(ax, curves(key, method="warp", iteration=i, runs=every), f"iteration {i}",
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
    return max(claims_lib.match(records, method="warp_run", iteration=1, seed=seed, run=run),
               key=lambda r: r["step"])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=pathlib.Path(__file__).parent
                              ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _num(x, fmt="+.3f") -> str:
    """A statistic, or `n/a` where it is undefined (NaN, null in the JSON)."""
    return "n/a" if x is None else format(x, fmt)


def _verdict(x: dict) -> str:
    if x["verdict"] == "inconclusive":
        needed = x["seeds_needed"]
        return (f"inconclusive (needs {needed} seeds)" if needed is not None else
                "inconclusive (no seed count decides it)")
    return x["verdict"]


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


# What changed from the design of the study's first report (commit 8a22d26), and why: the
# decision record the report carries.
CHANGES = [
    "- **The proxy.** It was a Bradley-Terry model of 150 steps at a constant rate on 3.7k "
    "hard-labelled pairs sampled at temperature 1.0: pair accuracy 0.57, Spearman 0.36 with "
    "gold, so no gold verdict could move. Now: pairs of completions of the same prompt at the "
    "RL temperature, soft labels from the gold margin, warm-up and cosine decay, early "
    "stopping on a held-out curve, and a gate fixed in the config before any RL.",
    "- **Claim 1** compared one SFT-anchored beta inside a window where the EMA run had one "
    "evaluation. Now: the SFT anchor at every beta of `study.sft_betas` against the EMA "
    "anchor, each at the same steps, within the KL both reach, and the EMA weights against "
    "their live policy (the paper's Fig. 14).",
    "- **Claim 2** is stated as the paper's Observations 2 and 3 are: against the merged runs "
    "themselves, KL effects in log KL.",
    "- **Claim 4** pitted the last iteration (M x I x T run-steps) against baselines of "
    "I x T steps, pooled. Now iteration 1 (M x T run-steps) against each baseline of M x T "
    "steps, and Observation 5's second half.",
    "- **Claim 5** compared run 0 alone with the merge of all; now every run alone, disjoint "
    "pairs and all runs, plus one run of the same run-steps (the paper's Fig. 13 control).",
    "- **Fronts** were read linearly in KL at fractions of the KL the weaker curve reached, "
    "from three evaluations per run and six etas, which favours whichever method moves less. "
    "Now: evaluations every `eval.every` steps, nine etas, fronts read in log KL and compared "
    "at absolute KL levels fixed in the config, each extended flat beyond its reach.",
    "- **Statistics.** '> 0 in every seed and p < 0.05' loses power as seeds are added and "
    "called an absent effect a refutation. Now: one-sided bounds against a smallest effect "
    "of interest, equivalence tests, Holm's correction across claims, `seeds_needed` for "
    "what is inconclusive, standard errors clustered by prompt, and 6 seeds.",
    "- **Dropped**: the beta pilot (beta is the paper's 0.1; claim 1's sweep covers the SFT "
    "anchor's beta), pilot runs of mu, and a second, weaker proxy (Gao et al.'s design): "
    "what the time budget of about 2.5 hours on 2 cores could not hold.",
]


def _markdown(run, claims, config, figures, command) -> str:
    c, meta, machine = config, run["setup"], run["machine"]
    s = c["study"]
    records = run["records"]
    rm, gate = meta["reward_model"], meta["gate"]
    minutes = sum(run["wall_seconds"]) / 60
    invocations = len(run["wall_seconds"])
    resumed = (f", summed over the {invocations} invocations that computed part of it (a "
               "rerun resumes from the workdir)")
    sft = records[0]
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
        "what the tests run); any field is overridable (`--config.study.seeds=8`), and a bad "
        "value stops it with one line. Killed and rerun with the same workdir, it resumes "
        "where it stopped (every run and evaluation is checkpointed, as in the main job); a "
        "finished study only judges the claims again and rewrites the report. `W/claims.json` "
        "holds each claim's verdict on both rewards with every effect behind it (per seed, "
        "mean, bounds, raw and Holm-corrected p-values, `seeds_needed`), `W/study.json` every "
        "evaluated point, the task-vector geometry and the set-up.", "",
        "## Rules, fixed before the run", "",
        f"Every claim is judged by effects measured once per seed ({s['seeds']} seeds), each "
        "claiming a sign (`positive`) or an absence (`equivalent`, within +-sesoi):", "",
        f"- *supported*: the one-sided {1 - s['alpha']:.0%} lower bound is above 0 "
        "(`equivalent`: both one-sided tests put the mean inside +-sesoi);",
        f"- *refuted*: the one-sided {1 - s['alpha']:.0%} upper bound is below the smallest "
        "effect of interest sesoi, i.e. the effect is absent or of the other sign "
        "(`equivalent`: the mean is significantly beyond +-sesoi);",
        "- *inconclusive* otherwise, with `seeds_needed`: the seeds at which the observed mean "
        "and spread would decide, at the Bonferroni level that bounds Holm's.",
        "- A claim is supported if all its primary effects are (its p-value is their "
        "largest: an intersection-union test), refuted if one is (the smallest refuting "
        "p-value times their number); the claims on one reward are Holm-corrected at alpha "
        f"= {s['alpha']}. Secondary effects, reported beside them, decide nothing.",
        f"- Fronts are upper envelopes with the SFT policy at KL 0, read in log KL between "
        f"measured points, compared at KL = {', '.join(f'{x:g}' for x in s['kl_levels'])} "
        "nats, each extended flat beyond its last point (the best reward measured within that "
        "KL budget), unless a rule says *within both*.",
        "- Smallest effects of interest: " + ", ".join(
            f"{k.replace('oracle_reward', 'gold').replace('proxy_reward', 'proxy')} "
            f"{v:g}" for k, v in s["sesoi"].items()) + " (proxy in standard deviations of "
        "the SFT policy's proxy scores, gold in P(fresh)).",
        f"- Gold verdicts count only if the proxy passes its gate: held-out pair accuracy >= "
        f"{s['gate_accuracy']} and Spearman(proxy, gold) >= {s['gate_spearman']} on fresh SFT "
        "samples; below it every gold verdict is *untestable*.", "",
        "| claim | rule |", "|---|---|",
        *[f"| {k}. {title} | {claims_lib.RULES[k]} |" for k, title in claims_lib.CLAIMS.items()],
        "", "## Setup", "",
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
        "on a held-out tenth of it.",
        f"- **Proxy reward**: a Gemma Bradley-Terry model (from the SFT policy, read out by "
        f"{c['reward']['pooling']} pooling of its tokens' scores) trained on {rm['pairs']} "
        f"pairs of SFT completions of the same prompt at temperature "
        f"{rm['pair_temperature']}, {rm['labels']} labels from gold, Adam at "
        f"{c['reward']['learning_rate']:g} with {c['reward']['warmup_steps']} warm-up steps "
        f"and cosine decay over {c['reward']['steps']}, kept at its best held-out loss (step "
        f"{rm['steps']}; held-out accuracy "
        + ", ".join(f"{x['accuracy']:.3f} at step {x['step']}" for x in rm["curve"][::4])
        + f"); standardised on {rm['norm_samples']} SFT completions.",
        f"- **RL**: REINFORCE with RLOO (K = {c['rl']['num_samples']}), "
        f"{c['rl']['batch_size']} prompts a step, Adam lr {c['rl']['learning_rate']:g} after "
        f"{c['rl']['warmup_steps']} warm-up steps, temperature {c['rl']['temperature']}, "
        f"{c['rl']['max_new_tokens']} new tokens, EMA rate mu {c['rl']['mu']}, beta "
        f"{run['beta']:g}. WARP: I = {c['warp']['iterations']} iterations of "
        f"M = {c['warp']['runs']} runs of T = {c['warp']['steps']} steps, LITI eta "
        f"{c['warp']['eta']} between iterations, fronts on eta = "
        f"{', '.join(f'{x:g}' for x in c['warp']['eta_grid'])}. SFT-anchored runs at beta = "
        f"{', '.join(f'{x:g}' for x in meta['sft_betas'])} for T steps; baselines "
        f"(SFT and EMA anchor) for M x T steps.",
        f"- **Evaluation**: {meta['eval_prompts']} held-out prompts x {c['eval']['samples']} "
        f"samples, every {c['eval']['every']} steps (common random numbers); KL is the "
        "Monte-Carlo KL(pi || pi_sft) per completion; standard errors are clustered by prompt. "
        f"The SFT policy scores {sft['proxy_reward']:+.3f} proxy and "
        f"{sft['oracle_reward']:.3f} gold.", "",
        "## The proxy's gate", "",
        f"Held-out pair accuracy **{gate['held_out_accuracy']:.3f}** on {rm['held_out_pairs']} "
        f"pairs (gate {gate['accuracy_bound']}), Spearman(proxy, gold) on "
        f"{rm['norm_samples']} fresh SFT samples **{_num(gate['sft_spearman'], '.3f')}** "
        f"(gate {gate['spearman_bound']}): "
        + ("**passed**." if gate["passed"] else f"**not passed** ({gate['reason']}): every "
           "gold verdict below is *untestable*.") + " Accuracy by gold margin "
        f"({rm['margin_units']}):", "",
        "| margin | pairs | accuracy |", "|---|---:|---:|",
        *[f"| {b['margin'][0]:g} to {_num(b['margin'][1], 'g').replace('n/a', 'inf')} | "
          f"{b['pairs']} | "
          f"{_num(b['accuracy'], '.3f')} |" for b in rm["accuracy_by_margin"]], "",
    ]
    by = {(x["claim"], x["reward"]): x for x in claims}
    lines += ["## Verdicts", "", "| claim | proxy reward | gold reward |", "|---|---|---|"]
    for k, title in claims_lib.CLAIMS.items():
        lines.append(f"| {k}. {title} | {_verdict(by[k, 'proxy'])} | "
                     f"{_verdict(by[k, 'gold'])} |")
    lines.append("")
    for k, title in claims_lib.CLAIMS.items():
        lines += [f"## Claim {k}: {title}", "", f"Rule: {claims_lib.RULES[k]}.", ""]
        for name in claims_lib.REWARDS:
            x = by[k, name]
            lines.append(f"- {name}: **{_verdict(x)}** (Holm-corrected p "
                         f"{_num(x['p_support_holm'], '.3g')} to support, "
                         f"{_num(x['p_refute_holm'], '.3g')} to refute)"
                         + (f"; {x['note']}" if "note" in x else ""))
        lines += ["", "| reward | effect | mean +- se | one-sided bounds | p support / refute "
                  "| verdict |", "|---|---|---|---|---|---|"]
        for name in claims_lib.REWARDS:
            for e in by[k, name]["effects"]:
                lines.append(
                    f"| {name} | {e['effect']} ({e['kind']}, sesoi {e['sesoi']:g}"
                    f"{'' if e['primary'] else ', secondary'}) | {_num(e['mean'])} +- "
                    f"{_num(e['se'], '.3f')} | [{_num(e['lower'])}, {_num(e['upper'])}] | "
                    f"{_num(e['p_support'], '.3g')} / {_num(e['p_refute'], '.3g')} | "
                    f"{_verdict(e)} |")
        lines += ["", "Each effect's p-values are uncorrected; its verdict is at the "
                  "Bonferroni level over the claims (secondary effects: Holm over their "
                  "own family).", "", f"![claim {k}]({figures[k]})", ""]
    lines += ["## Reward hacking", "",
              "The Spearman correlation between proxy and gold scores of a policy's samples "
              f"is {_num(sft['rank_correlation'])} for the SFT policy; the figure shows it "
              "for every evaluated policy against its KL.", "", *_hacking(records), "",
              f"![rank correlation]({figures[0]})", "",
              "## What changed from the previous design, and why", "", *CHANGES, "",
              "## What differs from the paper", "",
              f"- Scale: a {meta['parameters'] / 1e6:.1f}M-parameter Gemma completing "
              f"{c['rl']['max_new_tokens']} tokens of a review, not Gemma 7B answering "
              f"conversations in 300; T = {c['warp']['steps']} steps, not 9k; "
              f"{c['rl']['batch_size']} prompts a step, not 128.",
              "- Rewards: the paper optimises a large reward model and reports it alone; here "
              "a small proxy trained on gold-labelled pairs, and the gold reward beside it.",
              f"- The learning rate ({c['rl']['learning_rate']:g}, Adam) and the EMA rate (mu "
              f"= {c['rl']['mu']:g}, not piloted) are scaled to runs of {c['warp']['steps']} "
              "steps (the paper: 1e-6 and 0.01 over 9k).",
              f"- M = {c['warp']['runs']} runs and I = {c['warp']['iterations']} iterations "
              "(the paper: M = 2 by default, up to 5; I = 5).", ""]
    return "\n".join(lines)
