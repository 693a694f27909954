from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from slipstream.artifact import Bundle
from slipstream.build.recipe import Budget, load_recipe, parse_recipe
from slipstream.build.record import CandidateMetrics, CandidateResult, RunRecord
from slipstream.build.report import Point, pareto_front, render_html
from slipstream.build.search import BuildResult, run_build
from slipstream.build.select import select
from slipstream.errors import ConfigError
from tests.browser import screenshot
from tests.onnx_models import build_trained_digits_mlp

RECIPE = {
    "name": "digits",
    "model": "digits.onnx",
    "data": {"eval": "eval.npz"},
    "budget": {"max_accuracy_drop": 0.01},
}


def test_a_typo_names_the_field_and_suggests_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: d\nmodel: m.onnx\ndata: {eval: e.npz}\nbudget: {max_accuracy_dorp: 0.01}\ntraget: cpu\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "unknown field 'budget.max_accuracy_dorp' (did you mean 'max_accuracy_drop'?)" in text
    assert "unknown field 'traget' (did you mean 'target'?)" in text
    assert "'budget.max_accuracy_drop': Field required" in text


def test_closed_sets_are_checked_before_any_work() -> None:
    with pytest.raises(ConfigError, match="'target'"):
        parse_recipe({**RECIPE, "target": "tpu"})
    with pytest.raises(ConfigError, match="unknown metric 'acc'"):
        parse_recipe({**RECIPE, "metric": "acc"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_recipe(["not", "a", "mapping"])


def _m(quality: float, p50: float, size: int = 1000) -> CandidateMetrics:
    return CandidateMetrics(
        quality=quality, latency_p50_ms=p50, latency_p99_ms=p50 * 2, throughput_sps=1000 / p50, size_bytes=size
    )


def _record(*candidates: CandidateResult, objective: str = "latency") -> RunRecord:
    baseline = CandidateResult(name="baseline", passes=(), status="ok", metrics=_m(0.95, 10.0, 4000))
    return RunRecord.model_validate(
        {
            "name": "t",
            "recipe": {},
            "recipe_sha256": "x",
            "metric": "accuracy",
            "higher_is_better": True,
            "objective": objective,
            "batch_size": 1,
            "baseline": baseline.model_dump(),
            "candidates": [c.model_dump() for c in candidates],
        }
    )


def _ok(name: str, quality: float, p50: float, size: int = 1000) -> CandidateResult:
    return CandidateResult(name=name, passes=("p",), status="ok", metrics=_m(quality, p50, size))


def test_select_gives_every_rejection_a_reason() -> None:
    record = _record(
        _ok("fast-but-wrong", 0.90, 2.0),
        _ok("slow", 0.95, 9.9),
        _ok("good", 0.945, 5.0),
        _ok("better", 0.945, 4.0),
        CandidateResult(name="broken", passes=("p",), status="failed", error="PassError: boom"),
    )
    sel = select(record, Budget(max_accuracy_drop=0.01))
    assert sel.winner == "better"
    assert "2.50× the baseline" in sel.reason
    reasons = {r.name: r.reason for r in sel.rejections}
    assert reasons["fast-but-wrong"].startswith("over budget: accuracy drop 0.0500 > 0.0100")
    assert reasons["slow"].startswith("not better than the baseline on latency: 1.01×")
    assert reasons["good"] == "within budget but beaten by better: 2.00× vs 2.50×"
    assert reasons["broken"] == "failed: PassError: boom"
    assert set(reasons) == {"fast-but-wrong", "slow", "good", "broken"}


def test_select_relative_budget_size_objective_and_no_winner() -> None:
    record = _record(_ok("small", 0.94, 10.0, size=1000), objective="size")
    assert select(record, Budget(max_accuracy_drop=0.02, kind="relative")).winner == "small"
    assert select(record, Budget(max_accuracy_drop=0.001, kind="relative")).winner == "baseline"
    assert select(_record(), Budget(max_accuracy_drop=0.1)).reason.startswith("no candidate")


def test_pareto_front_and_html() -> None:
    pts = [Point("a", 1, 0.9, "kept"), Point("b", 2, 0.95, "kept"), Point("c", 3, 0.94, "rejected")]
    assert [p.name for p in pareto_front(pts)] == ["a", "b"]
    record = _record(_ok("better", 0.945, 4.0))
    record = record.model_copy(update={"selection": select(record, Budget(max_accuracy_drop=0.01))})
    page = render_html(record)
    assert page.count("<svg") == 2 and 'class="pareto"' in page
    assert '<tr class="winner"><td>better</td>' in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched: works offline


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildResult, BuildResult, Path]:
    work = tmp_path_factory.mktemp("build")
    model, x, y = build_trained_digits_mlp()
    onnx.save_model(model, str(work / "digits.onnx"))
    np.savez(work / "eval.npz", pixels=x, labels=y)
    raw = {
        **RECIPE,
        "model": str(work / "digits.onnx"),
        "data": {"eval": str(work / "eval.npz")},
        "batch_size": 64,
        "bench_time_s": 0.2,
        "output": str(work / "out"),
        "candidates": [
            {"name": "optimized", "passes": ["graph.optimize"]},
            {"name": "int8-dynamic", "passes": [{"quantize.dynamic": {"per_channel": True}}]},
            {"name": "int8-static", "passes": [{"quantize.static": {"data": str(work / "eval.npz")}}]},
            {"name": "misconfigured", "passes": [{"quantize.static": {"calibration": "median"}}]},
        ],
    }
    recipe = parse_recipe(raw)
    return run_build(recipe), run_build(recipe), work


def test_build_records_every_candidate_and_packages_the_winner(built: tuple[BuildResult, BuildResult, Path]) -> None:
    first, _, work = built
    record = json.loads((work / "out" / "run.json").read_text())
    names = [c["name"] for c in record["candidates"]]
    assert names == ["optimized", "int8-dynamic", "int8-static", "misconfigured"]
    failed = next(c for c in record["candidates"] if c["name"] == "misconfigured")
    assert failed["status"] == "failed" and "calibration" in failed["error"]
    sel = first.record.selection
    assert sel is not None
    assert {r.name for r in sel.rejections} | {sel.winner} >= set(names) - {sel.winner}
    assert any(r.name == "misconfigured" and r.reason.startswith("failed:") for r in sel.rejections)
    if sel.winner != "baseline":  # a winner's gain was re-checked side by side with the baseline
        confirmed = first.record.candidate(sel.winner).confirmed_gain
        assert confirmed is not None and confirmed >= 1.05
    base = first.record.baseline.metrics
    assert base is not None and base.quality > 0.9  # a real trained classifier
    winner = Bundle.load(work / "out" / "winner")
    assert winner.manifest.lineage[-1].step == "build.select@1"
    assert "profile.json" in winner.manifest.files  # the reference monitoring compares live traffic with
    build_metrics = winner.manifest.metrics["build"]
    assert isinstance(build_metrics, dict) and build_metrics["metric"] == "accuracy"
    assert winner.manifest.resolved["session"] == first.record.tuning["chosen"]


def test_build_report_shows_table_and_plots(built: tuple[BuildResult, BuildResult, Path]) -> None:
    _, _, work = built
    page = (work / "out" / "report.html").read_text()
    for name in ("optimized", "int8-dynamic", "int8-static", "misconfigured", "Pareto"):
        assert name in page
    report = json.loads((work / "out" / "report.json").read_text())
    assert report["pareto_latency"] and report["selection"]["winner"]


def test_an_onnx_source_gets_the_gradient_free_robustness_checks(built: tuple[BuildResult, BuildResult, Path]) -> None:
    first, second, work = built
    summary = first.record.robustness
    assert summary is not None and summary.status == "measured" and summary.gradient_source is None
    assert "source framework 'onnx' gives no gradients" in (summary.gradient_note or "")
    measured = [first.record.baseline, *(c for c in first.record.candidates if c.status == "ok")]
    for cand in measured:
        robust = cand.robustness
        assert robust is not None and robust.error is None, cand.name
        assert {r.attack for r in robust.results} == {"uniform", "gaussian", "simba"}
        for r in robust.results:  # SimBA only ever lowers the true class's margin: it cannot fix a wrong row
            assert r.attack != "simba" or (r.accuracy <= robust.clean_accuracy and (r.queries or 0) > 0)
    assert [c.robustness for c in second.record.candidates] == [c.robustness for c in first.record.candidates]
    page = (work / "out" / "report.html").read_text()
    assert '<table id="robustness">' in page and "No FGSM/PGD: source framework" in page


def test_second_build_reuses_the_cache(built: tuple[BuildResult, BuildResult, Path]) -> None:
    first, second, _ = built
    ok = [c for c in second.record.candidates if c.status == "ok"]
    assert ok and all(c.cache_hits == len(c.passes) for c in ok)
    assert [c.metrics for c in second.record.candidates] == [c.metrics for c in first.record.candidates]
    assert second.record.tuning == first.record.tuning


def test_report_renders_in_headless_chromium(built: tuple[BuildResult, BuildResult, Path]) -> None:
    _, _, work = built
    png = work / "report.png"
    facts = screenshot((work / "out" / "report.html").as_uri(), png, selector="svg.plot")
    assert facts["title"] == "slipstream build: digits"
    svgs = facts["svgs"]
    assert isinstance(svgs, list) and len(svgs) == 3
    for svg in svgs:  # the three Pareto plots are laid out with real size and one point per measured model
        assert svg["w"] > 300 and svg["h"] > 200 and svg["points"] == 4
    assert facts["tableRows"] == 1 + 5  # header, baseline, four candidates
    assert png.stat().st_size > 20_000


def test_a_gain_that_does_not_hold_up_side_by_side_is_rejected() -> None:
    shaky = _ok("shaky", 0.95, 5.0).model_copy(update={"confirmed_gain": 0.98})
    record = _record(shaky, _ok("steady", 0.95, 8.0).model_copy(update={"confirmed_gain": 1.2}))
    sel = select(record, Budget(max_accuracy_drop=0.01))
    assert sel.winner == "steady"
    reasons = {r.name: r.reason for r in sel.rejections}
    assert reasons["shaky"].startswith("not faster when re-timed alternately with the baseline: 0.98×")


def test_static_int8_over_budget_triggers_sensitivity_and_exclusions(tmp_path: Path) -> None:
    """A zero fidelity budget: every int8 candidate is over it, so the build finds the layers to keep in fp32."""
    model, x, y = build_trained_digits_mlp()
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "eval.npz", pixels=x[:200], labels=y[:200])
    recipe = parse_recipe(
        {
            **RECIPE,
            "model": str(tmp_path / "m.onnx"),
            "data": {"eval": str(tmp_path / "eval.npz")},
            "metric": "cosine",
            "budget": {"max_accuracy_drop": 0.0},
            "batch_size": 32,
            "bench_time_s": 0.1,
            "output": str(tmp_path / "out"),
        }
    )
    record = run_build(recipe).record
    assert record.sensitivity is not None
    assert {row.node for row in record.sensitivity.layers} == {"fc0", "fc1"}
    rescued = [c for c in record.candidates if c.name == "int8-static-excl"]
    assert len(rescued) == 1 and "nodes_to_exclude" in rescued[0].passes[0]
    assert 'id="sensitivity"' in (tmp_path / "out" / "report.html").read_text()


def test_monitor_profile_writes_a_new_profiled_bundle(built: tuple[BuildResult, BuildResult, Path]) -> None:
    from typer.testing import CliRunner

    from slipstream.cli import app

    _, _, work = built
    args = ["monitor", "profile", str(work / "out" / "baseline"), "--data", str(work / "eval.npz")]
    result = CliRunner().invoke(app, [*args, "-o", str(work / "profiled"), "--task", "classification"])
    assert result.exit_code == 0, result.output
    profiled = Bundle.load(work / "profiled")
    assert profiled.manifest.lineage[-1].step == "profile@1"
    assert "profile.json" in profiled.manifest.files
    # A classifier gets its penultimate layer as a monitoring-only output, sampled for the embedding test.
    assert [s.step for s in profiled.manifest.lineage[-2:]] == ["monitor.embedding@1", "profile@1"]
    assert "embedding output" in result.output and not (work / ".profiled.embedding").exists()
    assert "profile.json" not in Bundle.load(work / "out" / "baseline").manifest.files  # the source is untouched
    bad = CliRunner().invoke(app, [*args, "-o", str(work / "p2"), "--task", "clustering"])
    assert bad.exit_code == 2 and "auto, classification or regression" in bad.output
