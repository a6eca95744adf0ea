"""The promotion gate, as pure functions over an evaluation summary (no MLflow here).

Two checks, both needed for `champion`:

1. **IID gate** (the recipe), a non-inferiority test on the interval: for every gate metric
   (default AUC and recall@K, 0.5%) the 95% interval of the relative change of `sorted_fixed`
   against `iid` (``summary["aggregate"]["intervals"]``, from
   `reqdedup.evaluate.metrics.relative_change_interval`: paired request bootstrap + seed
   spread) lies above ``-tolerance`` (below ``+tolerance`` for log loss). A summary without
   an interval for a gate metric is refused: a mean alone cannot support the claim.
2. **Champion check** (the model): the registered checkpoint's own metrics (the chosen seed's
   run) beat the current champion's on the same evaluation set: no gate metric worse and at
   least one strictly better. A champion evaluated on a different eval set (or holding no
   evaluation tags) cannot be compared: that is said in the decision, and the IID gate
   decides alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from reqdedup.contract import BASELINE_CONFIG, CANDIDATE_CONFIG
from reqdedup.evaluate.metrics import higher_is_better, non_inferior

BASELINE = BASELINE_CONFIG
CANDIDATE = CANDIDATE_CONFIG


@dataclass
class GateDecision:
    promote: bool
    checks: list[dict] = field(default_factory=list)  # {check, metric, passed, detail}
    reasons: list[str] = field(default_factory=list)  # why not promoted
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        head = "PROMOTE to champion" if self.promote else "NOT promoted: the champion stays"
        lines = [head, ""]
        lines += [f"[{'pass' if c['passed'] else 'FAIL'}] {c['check']}: {c['detail']}" for c in self.checks]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        if self.reasons:
            lines += ["", *[f"reason: {r}" for r in self.reasons]]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"promote": self.promote, "checks": self.checks, "reasons": self.reasons, "notes": self.notes}


def config_means(summary: dict, config: str) -> dict:
    """Mean over seeds of every metric of one config."""
    try:
        return {m: st["mean"] for m, st in summary["aggregate"]["configs"][config].items()}
    except KeyError:
        raise ValueError(f"the evaluation holds no config {config!r}") from None


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def within_tolerance(candidate: float, baseline: float, tolerance: float, metric: str) -> bool:
    if not (_ok(candidate) and _ok(baseline)):
        return False
    if higher_is_better(metric) is False:
        return candidate <= baseline * (1 + tolerance) if baseline >= 0 else candidate <= baseline * (1 - tolerance)
    return candidate >= baseline * (1 - tolerance) if baseline >= 0 else candidate >= baseline * (1 + tolerance)


def beats(candidate: dict, champion: dict, metrics: list[str]) -> tuple[bool, list[str]]:
    """No gate metric worse and at least one strictly better (direction-aware)."""
    worse, better, detail = [], 0, []
    for m in metrics:
        c, h = candidate.get(m), champion.get(m)
        if not (_ok(c) and _ok(h)):
            worse.append(f"{m}: not comparable ({c} vs {h})")
            continue
        up = higher_is_better(m) is not False
        if (c < h) if up else (c > h):
            worse.append(f"{m} {c:.5f} vs champion {h:.5f}")
        elif c != h:
            better += 1
        detail.append(f"{m} {c:.5f} vs {h:.5f}")
    if worse:
        return False, worse
    if better == 0:
        return False, [f"ties the champion on every gate metric ({'; '.join(detail)})"]
    return True, detail


def decide(summary: dict, *, tolerance: float, metrics: list[str], model_metrics: dict,
           champion: dict | None) -> GateDecision:
    """Gate decision for registering `sorted_fixed` from an evaluation summary.

    model_metrics: the registered checkpoint's own eval metrics (same eval set as summary).
    champion: None, or {"version", "eval_set_id", "metrics"} read from the champion's tags.
    """
    d = GateDecision(promote=False)
    if summary.get("status") != "succeeded":
        d.reasons.append(f"evaluation status is {summary.get('status')!r}, not 'succeeded'")
        return d
    cand, base = config_means(summary, CANDIDATE), config_means(summary, BASELINE)
    intervals = (summary.get("aggregate", {}).get("intervals") or {}).get(CANDIDATE, {})
    for m in metrics:
        c, b, iv = cand.get(m), base.get(m), intervals.get(m)
        if not iv:
            ok = False
            detail = (f"no interval of the change against {BASELINE} on {m} in the summary (means "
                      f"{c} vs {b}): a mean alone cannot show non-inferiority")
        else:
            ok = non_inferior(iv, tolerance, m)
            bound = "lower" if higher_is_better(m) is not False else "upper"
            detail = (f"{CANDIDATE} mean {c:.5f} vs {BASELINE} mean {b:.5f}: change {100 * iv['point']:+.3f}%, "
                      f"{100 * iv.get('level', 0.95):.0f}% interval [{100 * iv['low']:+.3f}%, {100 * iv['high']:+.3f}%] "
                      f"over {iv.get('n_seeds')} seeds; non-inferiority needs the {bound} bound "
                      f"{'>=' if bound == 'lower' else '<='} {'-' if bound == 'lower' else '+'}{100 * tolerance:.3g}%")
        d.checks.append({"check": f"non-inferior to {BASELINE} on {m}", "metric": m, "passed": ok, "detail": detail})
        if not ok:
            d.reasons.append(f"{CANDIDATE} is not shown non-inferior to {BASELINE} within {100 * tolerance:.3g}% "
                             f"on {m}: {detail}")
    if champion is None:
        d.notes.append("no current champion: the IID gate decides alone")
    elif champion.get("eval_set_id") != summary.get("eval_set_id") or not champion.get("metrics"):
        d.notes.append(f"the current champion (version {champion.get('version')}) was evaluated on a different "
                       f"evaluation set ({champion.get('eval_set_id') or 'unknown'}, this one is "
                       f"{summary.get('eval_set_id')}): not comparable, decided by the IID gate alone")
    else:
        ok, detail = beats(model_metrics, champion["metrics"], metrics)
        d.checks.append({"check": f"beats champion version {champion.get('version')} on the same eval set",
                         "metric": ",".join(metrics), "passed": ok, "detail": "; ".join(detail)})
        if not ok:
            d.reasons.append(f"does not beat champion version {champion.get('version')} on eval set "
                             f"{summary.get('eval_set_id')}: {'; '.join(detail)}")
    d.promote = not d.reasons
    return d
