"""WARP's outputs: pareto_front.json and .png, summary.md, and the final policy in HF format."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from warp_jax import evaluation, sharding
from warp_jax.gemma import GemmaConfig, hf
from warp_jax.gemma.tokenizer import Tokenizer

_LABELS = {"reinforce_sft": "REINFORCE, SFT anchor", "reinforce_ema": "REINFORCE, EMA anchor",
           "warp_run": "WARP runs", "warp": "WARP (LITI of SLERP)",
           "lerp": "LERP in place of SLERP"}
_KEYS = ("method", "iteration", "run", "step", "eta", "proxy_reward", "proxy_reward_se",
         "oracle_reward", "oracle_reward_se", "kl", "kl_se", "rank_correlation")


def write_outputs(workdir: pathlib.Path, config, records: list[dict], final_policy: Any,
                  cfg: GemmaConfig, tokenizer: Tokenizer,
                  samples: dict[str, list[tuple[str, str]]]) -> None:
    """Writes the outputs from process 0: `records` (every evaluated point), the exported
    `final_policy` (host arrays of `cfg`, with `tokenizer`) and `samples` (per policy name,
    (prompt, completion) pairs)."""
    if not sharding.is_main_process():
        return
    records = [{k: r.get(k) for k in _KEYS} for r in records]
    rewards = [k for k in ("proxy_reward", "oracle_reward") if records[0].get(k) is not None]
    (workdir / "pareto_front.json").write_text(json.dumps(records, indent=1))
    _plot(workdir / "pareto_front.png", records, rewards, config)
    out_dir = workdir / "final_policy"
    hf.save_hf(final_policy, cfg, out_dir)
    tokenizer.save(out_dir / "tokenizer.model")
    _summary(workdir / "summary.md", records, rewards, config, samples)


def _plot(path: pathlib.Path, records, rewards, config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rewards), figsize=(6.5 * len(rewards), 4.8), squeeze=False)
    for ax, reward in zip(axes[0], rewards, strict=True):
        for method, style in (("reinforce_sft", "o-"), ("reinforce_ema", "s-"),
                              ("warp_run", ".:")):
            groups = sorted({(r["iteration"], r["run"]) for r in records
                             if r["method"] == method})
            for n, (it, run) in enumerate(groups):
                pts = sorted((r["step"], r["kl"], r[reward]) for r in records
                             if r["method"] == method and (r["iteration"], r["run"]) == (it, run))
                label = _LABELS[method] if n == 0 else None
                ax.plot([p[1] for p in pts], [p[2] for p in pts], style, alpha=0.6,
                        label=label, color={"reinforce_sft": "tab:gray",
                                            "reinforce_ema": "tab:blue"}.get(method, "tab:green"))
        for method, cmap in (("warp", plt.cm.Reds), ("lerp", plt.cm.Purples)):
            iterations = sorted({r["iteration"] for r in records if r["method"] == method})
            for it in iterations:
                pts = sorted((r["eta"], r["kl"], r[reward]) for r in records
                             if r["method"] == method and r["iteration"] == it)
                color = cmap(0.45 + 0.5 * it / max(iterations))
                ax.plot([p[1] for p in pts], [p[2] for p in pts], "D-", color=color,
                        label=f"{_LABELS[method]}, iteration {it}")
                for eta, kl, value in pts:
                    ax.annotate(f"{eta:g}", (kl, value), fontsize=7, xytext=(3, 3),
                                textcoords="offset points", color=color)
        ax.set_xlabel("KL(pi || pi_sft), nats per completion")
        ax.set_ylabel(reward.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"WARP, {config.variant}: I = {config.warp.iterations}, "
                 f"M = {config.warp.runs}, T = {config.warp.steps} (labels: eta)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _final_points(records, method):
    """The last evaluation of each run of a baseline method."""
    last = {}
    for r in records:
        if r["method"] == method:
            key = (r["iteration"], r["run"])
            if key not in last or r["step"] > last[key]["step"]:
                last[key] = r
    return list(last.values())


LEVELS = (0.25, 0.5, 0.75)  # matched-KL levels: fractions of the KL both compared fronts reach


def _verdicts(front, records, rewards) -> list[str]:
    """Per baseline and reward: WARP's final front minus each baseline run's front (the
    upper envelope of its evaluations, from the SFT point), averaged over `LEVELS`, as the
    mean and standard error over the baseline's runs (independent seeds)."""
    lines = []
    origin = [r for r in front if r["eta"] == 0.0]
    for reward in rewards:
        warp = [(r["kl"], r[reward]) for r in front]
        for method in ("reinforce_sft", "reinforce_ema"):
            runs = sorted({r["run"] for r in records if r["method"] == method})
            if not runs or not origin:
                continue
            fronts = [[(0.0, origin[0][reward])] + [
                (r["kl"], r[reward]) for r in records if r["method"] == method
                and r["run"] == run] for run in runs]
            gaps = [evaluation.matched_gap(warp, f, LEVELS) for f in fronts]
            finite = [g for g in gaps if np.isfinite(g)]
            name = f"{reward.replace('_', ' ')}: WARP's front minus {_LABELS[method]}'s"
            if not finite:
                reach = max(kl for f in fronts for kl, _ in f)
                lines.append(f"{name}: no comparison, the fronts share no KL range (WARP's "
                             f"reaches KL {max(kl for kl, _ in warp):.3g}, the baseline's "
                             f"{reach:.3g}).")
                continue
            mean, se = evaluation.mean_se(finite)
            spread = (f" ± {se:.3f} (standard error over {len(finite)} runs)"
                      if len(finite) > 1 else " (one run: no standard error)")
            left_out = (f"; {len(gaps) - len(finite)} run(s) share no KL range with it, left "
                        "out" if len(finite) < len(gaps) else "")
            lines.append(f"{name} is {mean:+.3f}{spread}, at "
                         f"{', '.join(f'{x:.0%}' for x in LEVELS)} of the KL both "
                         f"reach{left_out}.")
    return lines


def _summary(path, records, rewards, config, samples) -> None:
    iterations = config.warp.iterations
    front = sorted((r for r in records if r["method"] == "warp"
                    and r["iteration"] == iterations), key=lambda r: r["eta"])
    lines = [f"# WARP summary ({config.variant})", "",
             f"I = {iterations} iterations x M = {config.warp.runs} runs x T = "
             f"{config.warp.steps} steps; beta = {config.rl.beta}, mu = {config.rl.mu}, "
             f"LITI eta = {config.warp.eta}. KL is KL(pi || pi_sft) in nats per completion.", "",
             "## Final front and baselines", "",
             "| method | iteration | step | eta | KL | " + " | ".join(rewards) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(rewards)]
    shown = front + [p for m in ("reinforce_sft", "reinforce_ema")
                     for p in _final_points(records, m)]
    shown += sorted((r for r in records if r["method"] == "lerp"), key=lambda r: r["eta"])
    for r in shown:
        values = " | ".join(f"{r[k]:.3f} ± {r[k + '_se']:.3f}" for k in rewards)
        lines.append(f"| {_LABELS[r['method']]} | {r['iteration']} | {r['step'] or ''} | "
                     f"{'' if r['eta'] is None else r['eta']} | {r['kl']:.2f} ± "
                     f"{r['kl_se']:.2f} | {values} |")
    lines += ["", "## Verdict: WARP's final front against the baselines at matched KL", ""]
    lines += [f"- {line}" for line in _verdicts(front, records, rewards)]
    lines += ["", "Whether the paper's observations hold at small scale, on real review text and "
              "over seeds, judged by rules fixed in advance: warp_jax's reproduction study, "
              "docs/reproduction.md (`python -m experiments.reproduce`)."]
    lines += ["", "## Samples (held-out prompts, temperature "
              f"{config.rl.temperature})", ""]
    for name, pairs in samples.items():
        lines.append(f"**{name}** (final front, eta = {config.warp.export_eta})"
                     if name == "WARP" else f"**{name}**")
        lines += [f"- *{prompt}* {completion}" for prompt, completion in pairs] + [""]
    lines += ["## Task-vector geometry (the paper's Fig. 11)", ""]
    for file in sorted(path.parent.glob("records/iter*_geometry.json")):
        stats = json.loads(file.read_text())
        if stats:
            cos = [v["task_cosine"] for v in stats.values()]
            wcos = [v["weight_cosine"] for v in stats.values()]
            lines.append(f"- {file.stem.replace('_geometry', '')}: task-vector cosine between "
                         f"runs {np.mean(cos):.3f} (min {np.min(cos):.3f}, max {np.max(cos):.3f}) "
                         f"over {len(cos)} groups; full-weight cosine {np.mean(wcos):.4f}")
    path.write_text("\n".join(lines) + "\n")
