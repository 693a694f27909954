"""The main job in its fast mode: train, convert, build, serve, attack and shut down, for real; then the
demo's traffic for several seeds against the winner it built, where normal traffic must raise no alert and
the biased phase must raise the bias alert, with its interval."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import redirect_stdout

import numpy as np
import pytest
from typer.testing import CliRunner

from slipstream.artifact import Bundle
from slipstream.build.recipe import Budget
from slipstream.build.record import RunRecord
from slipstream.build.select import select
from slipstream.cli import app
from slipstream.demo import run_demo
from slipstream.demo.digits import held_out
from slipstream.demo.report import drift_label
from slipstream.demo.result import DemoResult
from slipstream.demo.session import DemoServer, demo_server
from slipstream.demo.traffic import Sampler, mirrored_for_minority
from slipstream.evaluate.robust import worst_drop
from slipstream.monitor.features import featurize

BIAS_RULES = {"demographic_parity", "demographic_parity_ratio", "equalized_odds"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, str]:
    """One full fast run (the build included), with what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        result = run_demo(tmp_path_factory.mktemp("demo"), fast=True, seed=0)
    return result, out.getvalue()


def test_demo_runs_end_to_end(demo: tuple[DemoResult, str]) -> None:
    result, printed = demo
    for heading in ("1 · train", "2 · convert", "3 · build", "4 · serve", "5 · traffic", "6 · what the server saw"):
        assert heading in printed
    assert "alerts firing after each phase, and why:" in printed
    assert result.tamper_refused and not (result.workdir / "tampered").exists()
    traffic = result.traffic
    assert traffic.server_errors == 0
    assert traffic.phase("malformed").statuses == {400: 7}
    assert traffic.phase("unauthenticated").statuses == {401: 5}
    burst = traffic.phase("burst").statuses
    assert burst.get(200, 0) > 0 and burst.get(429, 0) > 0 and set(burst) == {200, 429}
    assert traffic.store["dropped"] == 0
    assert traffic.labels_sent == 3 * traffic.rows_per_phase

    normal, drifted, biased = (traffic.view(k) for k in ("normal", "drifted", "biased"))
    assert normal.firing == [], [a.reason for a in normal.firing]  # no alert at all on normal traffic
    assert normal.drift_judged and normal.drifted_features == []
    assert (normal.input_features, normal.feature_noun) == (2, "image statistics")  # mean and std of one channel
    assert drift_label(normal) == "0 of 2 image statistics drifted"  # what the profile measures, not "64 pixels"
    # Inverted pixels: the image statistics drift, and once the labels are back, the accuracy drop is real.
    assert {"input_drift", "accuracy_drop"} <= drifted.rules and not BIAS_RULES & drifted.rules
    assert drifted.drifted_features and drifted.realized_accuracy is not None and drifted.realized_accuracy < 0.5
    drifted_accuracy = traffic.phase("drifted").accuracy
    assert drifted_accuracy is not None and drifted_accuracy < 0.5
    # Group b's 3s mirrored: the same image statistics, but the model selects 3 less often for group b.
    assert traffic.phase("biased").perturbed_rows > 0
    assert "demographic_parity_ratio" in biased.rules
    ratio = next(a for a in biased.firing if a.rule == "demographic_parity_ratio")
    assert ratio.value is not None and ratio.low is not None and ratio.high is not None
    assert ratio.low <= ratio.value <= ratio.high < 0.8
    assert f"{ratio.high:.4g}" in printed  # the interval is shown in the "and why" lines
    # A mirror keeps every pixel, so the image statistics cannot see it; and few rows are wrong.
    assert not {"input_drift", "multivariate_drift", "accuracy_drop"} & biased.rules
    assert "model_extraction" in traffic.view("attacks").rules  # the burst: one key repeating one digit

    winner = Bundle.load(result.winner)
    assert winner.manifest.lineage[-1].step == "build.select@1"
    assert (result.workdir / "build" / "report.html").is_file()


def test_the_demo_build_reports_clean_and_robust_accuracy_for_every_candidate(demo: tuple[DemoResult, str]) -> None:
    """FGSM and PGD at two ε, crafted on the torch source and sent to every candidate's onnxruntime session, beside
    clean accuracy; the robust budget applied to the real run record rejects exactly the candidates that lose."""
    out = demo[0].workdir / "build"
    record = RunRecord.model_validate_json((out / "run.json").read_text())
    summary = record.robustness
    assert summary is not None and summary.status == "measured" and summary.eps_of_range == (0.02, 0.05)
    assert summary.duration_s > 0 and summary.labels == "data"
    assert any(line.startswith("robust accuracy at ε 0.05 of the input range") for line in record.headline)
    measured = [c for c in (record.baseline, *record.candidates) if c.status == "ok"]
    assert {c.name for c in measured} == {"baseline", "int8-static", "pruned-50"}
    page = (out / "report.html").read_text()
    table = page[page.index('<table id="robustness">') :]
    table = table[: table.index("</table>")]
    for cand in measured:
        robust = cand.robustness
        assert robust is not None and robust.error is None, cand.name
        for eps in (0.02, 0.05):
            fgsm, pgd = robust.accuracy("fgsm", eps), robust.accuracy("pgd", eps)
            assert fgsm is not None and pgd is not None
        pgd = robust.accuracy("pgd", 0.05)
        assert pgd is not None and pgd < robust.clean_accuracy, cand.name  # the transferred examples hurt
        assert f"<td>{cand.name}</td>" in table
    for head in ("FGSM ε 0.02", "PGD ε 0.02", "FGSM ε 0.05", "PGD ε 0.05"):
        assert head in table
    strict = Budget(max_accuracy_drop=1.0, max_robust_accuracy_drop=0.0, min_speedup=1.0)
    reasons = {r.name: r.reason for r in select(record, strict).rejections}
    base = record.baseline.robustness
    for cand in record.candidates:
        assert base is not None and cand.robustness is not None
        worst = worst_drop(base, cand.robustness, relative=False)
        assert worst is not None
        over = reasons.get(cand.name, "").startswith("over budget: robust accuracy drop")
        assert over == (worst[0] > 0), (cand.name, worst, reasons)


def test_the_cli_takes_a_seed() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "--seed" in result.output


SEEDS = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def server(demo: tuple[DemoResult, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    """The winner the demo built, served once as one version per seed: each version has its own monitor."""
    with demo_server(demo[0].winner, tmp_path_factory.mktemp("seeds"), versions=len(SEEDS)) as running:
        yield running


@pytest.mark.parametrize("seed", SEEDS)
def test_normal_traffic_raises_no_alert_and_the_bias_is_caught(server: DemoServer, seed: int) -> None:
    """The demo's normal and biased phases for another seed each, against the winner built once."""
    x, y = held_out()
    version = str(SEEDS.index(seed) + 1)
    traffic = server.watch(x, y, seed=seed, version=version, labelled=("normal", "biased"), burst_requests=None)
    normal, biased = traffic.view("normal"), traffic.view("biased")
    assert normal.requests == traffic.phase("normal").requests  # this version's monitor saw this seed alone
    assert normal.firing == [], [a.reason for a in normal.firing]
    assert {"demographic_parity_ratio", "equalized_odds"} <= biased.rules, biased.fairness_reasons
    assert traffic.server_errors == 0


def test_the_traffic_comes_from_the_seed_and_the_groups_ignore_the_digit() -> None:
    x, y = held_out()
    one, again, other = (Sampler(seed, x, y).batch(2000, 16) for seed in (7, 7, 8))
    np.testing.assert_array_equal(one.x, again.x)
    assert one.groups == again.groups and one.groups != other.groups and not np.array_equal(one.y, other.y)
    rows_b = one.row_groups() == "b"
    assert 0.2 < rows_b.mean() < 0.4  # the minority share, 30 %, drawn per request
    # Groups are drawn apart from the rows, so the class of interest is as common in either group.
    assert abs((one.y[rows_b] == 3).mean() - (one.y[~rows_b] == 3).mean()) < 0.04


def test_the_bias_keeps_every_image_statistic_and_touches_only_group_bs_threes() -> None:
    x, y = held_out()
    batch = Sampler(3, x, y).batch(2000, 16)
    biased = mirrored_for_minority(batch, 3)
    changed = (biased.x != batch.x).reshape(len(batch.y), -1).any(axis=1)
    targets = (batch.row_groups() == "b") & (batch.y == 3)
    assert biased.perturbed == targets.sum() > 0 and not (changed & ~targets).any()
    assert changed.sum() == targets.sum()  # no 3 is symmetric enough to come out unchanged
    # What the drift profile watches (each image's mean and spread) is the same to rounding.
    np.testing.assert_allclose(featurize(biased.x), featurize(batch.x), rtol=0, atol=1e-12)
