"""Choosing the winner: a pure function over the run record, with a reason for every rejection."""

from __future__ import annotations

from slipstream.build.recipe import Budget
from slipstream.build.record import CandidateMetrics, CandidateResult, Rejection, RunRecord, Selection
from slipstream.evaluate.robust import worst_drop
from slipstream.evaluate.sidebyside import SideBySide


def quality_drop(baseline: float, candidate: float, *, higher_is_better: bool, relative: bool) -> float:
    """How much worse the candidate is (negative when better), absolute or as a fraction of the baseline."""
    drop = baseline - candidate if higher_is_better else candidate - baseline
    return drop / abs(baseline) if relative and baseline else drop


def objective_gain(baseline: CandidateMetrics, candidate: CandidateMetrics, objective: str) -> float:
    """How many times better the candidate is on the objective (> 1 is better)."""
    if objective == "throughput":
        return candidate.throughput_sps / baseline.throughput_sps
    if objective == "size":
        return baseline.size_bytes / candidate.size_bytes
    return baseline.latency_p50_ms / candidate.latency_p50_ms


def gain_text(cand: CandidateResult, first_pass: float) -> str:
    """The side-by-side ratio (or 'unstable (...)') when the candidate was re-timed, else the first pass, said so."""
    if cand.confirmation is not None and cand.confirmation.unstable:
        return f"its gain over the baseline, timed side by side, is {cand.confirmation.ratio_text()}"
    if cand.confirmation is not None:
        return f"{cand.confirmation.ratio_text()} the baseline, timed side by side"
    return f"{first_pass:.2f}× the baseline (first pass, not re-timed side by side)"


def _fmt_drop(drop: float, relative: bool) -> str:
    return f"{100 * drop:.2f} %" if relative else f"{drop:.4f}"


def robust_rejection(record: RunRecord, cand: CandidateResult, budget: Budget) -> str | None:
    """Why ``cand`` breaks ``budget.max_robust_accuracy_drop`` (None: within it, or no such budget)."""
    allowed = budget.max_robust_accuracy_drop
    if allowed is None:
        return None
    relative = budget.kind == "relative"
    base, mine = record.baseline.robustness, cand.robustness
    if base is None or mine is None or base.error is not None or mine.error is not None:
        why = (
            (mine.error if mine is not None else None)
            or (base.error if base is not None else None)
            or (record.robustness.reason if record.robustness is not None else None)
            or "no robustness measurement in the run"
        )
        return f"robust accuracy not measured ({why}), so budget.max_robust_accuracy_drop cannot be checked"
    worst = worst_drop(base, mine, relative=relative)
    if worst is None:
        return "robust accuracy not measured for any attack the baseline has, so the robust budget cannot be checked"
    drop, where = worst
    if drop <= allowed:
        return None
    how = "transferred from the source" if where.transfer else "on the candidate itself"
    return (
        f"over budget: robust accuracy drop {_fmt_drop(drop, relative)} under {where.attack} at ε "
        f"{where.eps_of_range:g} of the input range ({how}) > {_fmt_drop(allowed, relative)} allowed"
    )


def select(record: RunRecord, budget: Budget) -> Selection:
    """The candidate with the best objective among those within budget and faster by ``min_speedup``."""
    base = record.baseline.metrics
    if base is None:
        return Selection(winner=record.baseline.name, reason="the baseline could not be measured", rejections=())
    relative = budget.kind == "relative"
    eligible: list[tuple[float, float, CandidateResult]] = []
    rejections: list[Rejection] = []
    for cand in record.candidates:
        if cand.status == "skipped":
            rejections.append(Rejection(name=cand.name, reason=cand.error or "skipped"))
            continue
        if cand.status == "failed" or cand.metrics is None:
            rejections.append(Rejection(name=cand.name, reason=f"failed: {cand.error or 'no metrics'}"))
            continue
        if cand.same_as is not None:
            rejections.append(
                Rejection(name=cand.name, reason=f"byte-identical to {cand.same_as} (the same model, measured once)")
            )
            continue
        drop = quality_drop(
            base.quality, cand.metrics.quality, higher_is_better=record.higher_is_better, relative=relative
        )
        gain = objective_gain(base, cand.metrics, record.objective)
        if drop > budget.max_accuracy_drop:
            rejections.append(
                Rejection(
                    name=cand.name,
                    reason=f"over budget: {record.metric} drop {_fmt_drop(drop, relative)} > "
                    f"{_fmt_drop(budget.max_accuracy_drop, relative)} allowed",
                )
            )
        elif (robust := robust_rejection(record, cand, budget)) is not None:
            rejections.append(Rejection(name=cand.name, reason=robust))
        elif cand.confirmed_gain is not None and cand.confirmed_gain < budget.min_speedup:
            rejections.append(
                Rejection(
                    name=cand.name,
                    reason=f"not faster when re-timed alternately with the baseline: {cand.confirmed_gain:.2f}× "
                    f"(first measured {gain:.2f}×; needs ≥ {budget.min_speedup:.2f}×)",
                )
            )
        elif gain < budget.min_speedup:
            rejections.append(
                Rejection(
                    name=cand.name,
                    reason=f"not better than the baseline on {record.objective}: {gain:.2f}× "
                    f"(needs ≥ {budget.min_speedup:.2f}×)",
                )
            )
        else:
            # A side-by-side re-timing, when there is one, replaces the first-pass gain.
            confirmed = cand.confirmed_gain if record.objective != "size" else None
            eligible.append((gain if confirmed is None else confirmed, -drop, cand))
    if not eligible:
        return Selection(
            winner=record.baseline.name,
            reason="no candidate was both within the budget and better than the baseline",
            rejections=tuple(rejections),
        )
    eligible.sort(key=lambda item: (item[0], item[1]), reverse=True)
    duel = _duel(record, eligible)
    if duel is not None and not duel.unstable and duel.ratio >= budget.min_speedup:  # the runner-up wins
        eligible.insert(0, eligible.pop(next(i for i, e in enumerate(eligible) if e[2].name == duel.subject)))
    best_gain, best_neg_drop, best = eligible[0]
    for gain, _, cand in eligible[1:]:
        text = f"within budget but beaten by {best.name}: {gain:.2f}× vs {best_gain:.2f}×"
        if duel is not None and cand.name in (duel.reference, duel.subject):
            text = _duel_rejection(duel, best.name, budget.min_speedup)
        rejections.append(Rejection(name=cand.name, reason=text))
    reason = (
        f"best {record.objective} within budget: {gain_text(best, best_gain)}, "
        f"{record.metric} drop {_fmt_drop(-best_neg_drop, relative)}"
    )
    if duel is not None and best.name in (duel.reference, duel.subject):
        loser = duel.reference if best.name == duel.subject else duel.subject
        reason += f"; against {loser} head to head, timed side by side: {_duel_text(duel)}"
    return Selection(
        winner=best.name, reason=reason, rejections=tuple(rejections), runners=tuple(c.name for _, _, c in eligible[1:])
    )


def _duel(record: RunRecord, eligible: list[tuple[float, float, CandidateResult]]) -> SideBySide | None:
    """The recorded head-to-head, when both of its candidates are eligible and its reference (the confirmed
    winner) is the best. Its subject (the runner-up) wins only on a stable gain of at least ``min_speedup``;
    otherwise the reference stays ahead."""
    duel = record.head_to_head
    names = {c.name for _, _, c in eligible}
    if duel is None or not {duel.reference, duel.subject} <= names or eligible[0][2].name != duel.reference:
        return None
    return duel


def _duel_rejection(duel: SideBySide, best: str, min_speedup: float) -> str:
    """Why the head-to-head's other candidate is not the winner."""
    timed = f"head to head with {best}, timed side by side: {_duel_text(duel)}"
    if duel.unstable:
        return f"within budget; {timed}, so the confirmed order stands"
    if best == duel.reference and duel.ratio >= 1:
        return f"within budget; {timed}, short of the {min_speedup:.2f}× a change of winner needs"
    return f"within budget but slower; {timed}"


def _duel_text(duel: SideBySide) -> str:
    if duel.unstable:
        return f"{duel.subject} against {duel.reference}: {duel.ratio_text()}"
    faster, slower = (duel.subject, duel.reference) if duel.ratio >= 1 else (duel.reference, duel.subject)
    ratio = duel.ratio if duel.ratio >= 1 else 1 / duel.ratio
    return f"{faster} {ratio:.2f}× faster than {slower}"


def runner_up(record: RunRecord, selection: Selection) -> CandidateResult | None:
    """The eligible candidate the winner beat whose first pass was faster than the winner's: confirmations
    taken at different times reversed the first pass, so the two are worth timing together (None: no such)."""
    base = record.baseline.metrics
    if base is None or selection.winner == record.baseline.name or record.objective == "size":
        return None
    winner = record.candidate(selection.winner)
    if winner.metrics is None:
        return None
    first = objective_gain(base, winner.metrics, record.objective)
    gains = [
        (objective_gain(base, c.metrics, record.objective), c)
        for c in (record.candidate(n) for n in selection.runners)
        if c.metrics is not None
    ]
    faster = [(gain, c) for gain, c in gains if gain > first]
    return max(faster, key=lambda item: item[0])[1] if faster else None
