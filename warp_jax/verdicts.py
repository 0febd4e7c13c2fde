"""Verdicts on effects measured once per seed, as a reviewer would draw them.

An effect is a number per seed (a front minus another at fixed KL levels, say). What it
claims is one of two kinds:

- `"positive"`: the effect is > 0. *Supported* when the one-sided t-test that its mean is
  <= 0 is rejected (the lower (1 - alpha) confidence bound is above 0); *refuted* when the
  test that its mean is >= the smallest effect of interest `sesoi` is rejected (the upper
  bound is below `sesoi`: the effect is absent or of the other sign).
- `"equivalent"`: |effect| < `sesoi` (a gain that has saturated). *Supported* by the two
  one-sided tests (TOST) that the mean is within (-sesoi, sesoi); *refuted* when the mean is
  significantly beyond either end (each side at alpha / 2).

Neither is *inconclusive*, with `seeds_needed`: the seeds at which the observed mean and
spread would reach a verdict at the Bonferroni level alpha / m (which bounds Holm's).

A claim made of several effects (`judge_claims`) is supported when all are: its p-value is
their largest (an intersection-union test, valid at alpha as it stands), and refuted when one
is (the smallest refuting p-value times their number). Across the claims of a family (every
claim on one reward) both are corrected by Holm's step-down method, so the family's chance of
one false verdict stays at alpha. `judge` does the same for loose effects, one per claim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

KINDS = ("positive", "equivalent")
MAX_SEEDS = 10_000  # seeds_needed beyond this is reported as None


@dataclasses.dataclass(frozen=True)
class Effect:
    """An effect measured once per seed (NaN where a seed has no measurement), what it
    claims (`KINDS`) and its smallest effect of interest."""

    name: str
    per_seed: Sequence[float]
    sesoi: float
    kind: str = "positive"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"effect {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not self.sesoi > 0:
            raise ValueError(f"effect {self.name!r}: the smallest effect of interest must be "
                             f"> 0, got {self.sesoi}")


def _t():
    import scipy.stats

    return scipy.stats.t


def _summary(x: np.ndarray) -> tuple[int, float, float]:
    """(n, mean, standard error) of the finite values of `x`."""
    x = x[np.isfinite(x)]
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return n, mean, se


def _p_above(mean: float, se: float, n: int, bound: float) -> float:
    """The one-sided p-value of H0: mu <= bound (small when the mean is well above it)."""
    if n < 2 or not math.isfinite(se):
        return float("nan")
    if se == 0:
        return 0.0 if mean > bound else 1.0
    return float(_t().sf((mean - bound) / se, n - 1))


def p_values(effect: Effect) -> tuple[float, float]:
    """(p of the test that supports the claim, p of the test that refutes it), uncorrected;
    NaN with fewer than two finite seeds."""
    n, mean, se = _summary(np.asarray(effect.per_seed, np.float64))
    s = effect.sesoi
    if effect.kind == "positive":
        return _p_above(mean, se, n, 0.0), _p_above(-mean, se, n, -s)
    tost = max(_p_above(mean, se, n, -s), _p_above(-mean, se, n, -s))
    beyond = min(1.0, 2 * min(_p_above(mean, se, n, s), _p_above(-mean, se, n, s)))
    return tost, beyond


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p, np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    m, running = len(finite), 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def seeds_needed(effect: Effect, level: float) -> int | None:
    """The smallest number of seeds at which the observed mean and standard deviation give
    a verdict (either) at one-sided `level`; None if the effect has no spread to scale, no
    finite mean, or needs more than `MAX_SEEDS`."""
    x = np.asarray(effect.per_seed, np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return None
    mean, sd, s = float(x.mean()), float(x.std(ddof=1)), effect.sesoi
    if effect.kind == "positive":
        margins = [mean, s - mean]  # above 0 (support), below sesoi (refute)
    else:
        margins = [s - abs(mean), abs(mean) - s]  # inside the band, or beyond it
    margins = [d for d in margins if d > 0]
    if not margins:
        return None
    if sd == 0:
        return 2
    t = _t()
    d = max(margins)
    for n in range(2, MAX_SEEDS + 1):
        if d / (sd / math.sqrt(n)) > t.ppf(1 - level, n - 1):
            return n
    return None


def _verdict(p_support: float, p_refute: float, alpha: float) -> str:
    return ("supported" if p_support < alpha else "refuted" if p_refute < alpha
            else "inconclusive")


def judge_claims(claims: Sequence[Sequence[Effect]], alpha: float) -> list[dict]:
    """Each claim's verdict within its family `claims` (each a list of effects that must
    all hold), Holm-corrected across the claims at `alpha`: `verdict`, the claim's raw and
    adjusted p-values, `seeds_needed` when inconclusive (the most any undecided effect
    needs; None if one cannot say) and `effects`, each with its mean, standard error,
    one-sided (1 - alpha) bounds, raw p-values and its own verdict at the Bonferroni level
    alpha / (claims) (times its claim's effects, to refute)."""
    raw = [[p_values(e) for e in effects] for effects in claims]
    support = [max((1.0 if np.isnan(p) else p) for p, _ in ps) for ps in raw]
    refute = [min(1.0, len(ps) * min((1.0 if np.isnan(r) else r) for _, r in ps))
              for ps in raw]
    adjusted = zip(holm(support), holm(refute), strict=True)
    level = alpha / len(claims)
    out = []
    for effects, ps, s, r, (adj_s, adj_r) in zip(claims, raw, support, refute, adjusted,
                                                 strict=True):
        entries = []
        for e, (p_s, p_r) in zip(effects, ps, strict=True):
            n, mean, se = _summary(np.asarray(e.per_seed, np.float64))
            half = float(_t().ppf(1 - alpha, n - 1) * se) if n > 1 else float("nan")
            verdict = _verdict(p_s, len(effects) * p_r, level)
            entries.append({
                "effect": e.name, "kind": e.kind, "sesoi": e.sesoi,
                "per_seed": [float(v) for v in e.per_seed], "seeds": n, "mean": mean,
                "se": se, "lower": mean - half, "upper": mean + half, "p_support": p_s,
                "p_refute": p_r, "verdict": verdict,
                "seeds_needed": (seeds_needed(e, level / len(effects))
                                 if verdict == "inconclusive" else None)})
        verdict = _verdict(adj_s, adj_r, alpha)
        needed = [x["seeds_needed"] for x in entries if x["verdict"] == "inconclusive"]
        out.append({"verdict": verdict, "p_support": s, "p_refute": r,
                    "p_support_holm": adj_s, "p_refute_holm": adj_r,
                    "seeds_needed": (None if verdict != "inconclusive" or None in needed
                                     or not needed else max(needed)),
                    "effects": entries})
    return out


def judge(effects: Sequence[Effect], alpha: float) -> list[dict]:
    """Loose effects judged as claims of one effect each (`judge_claims`): each effect's
    entry, with its Holm-adjusted p-values and verdict."""
    out = []
    for claim in judge_claims([[e] for e in effects], alpha):
        entry = claim["effects"][0]
        entry.update({k: claim[k] for k in ("verdict", "seeds_needed", "p_support_holm",
                                            "p_refute_holm")})
        out.append(entry)
    return out
