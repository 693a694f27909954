"""Robust accuracy: real FGSM/PGD on the trained digits CNN, noise and SimBA, the recipe section, the robust
budget in select(). The build's own robustness stage (onnxruntime sessions of every candidate, the report's
table and Pareto view) is checked on builds the suite already runs: the demo's torch build
(tests/test_demo.py) and the ONNX-only build (tests/test_build.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slipstream.build.recipe import Budget, parse_recipe
from slipstream.build.record import CandidateMetrics, CandidateResult, RunRecord
from slipstream.build.report import render_html
from slipstream.build.select import select
from slipstream.demo.digits import build, split
from slipstream.errors import ConfigError
from slipstream.evaluate.attacks import Predict, simba
from slipstream.evaluate.robust import (
    AttackAccuracy,
    AttackSet,
    CandidateRobustness,
    RobustnessConfig,
    RobustnessSummary,
    craft,
    evaluate,
    prepare,
)


def _torch_predict(module: torch.nn.Module) -> Predict:
    """The module's scores on one thread (many small calls; two threads on a busy 2-core machine are far slower)."""

    def predict(x: np.ndarray) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return np.asarray(module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy())
        finally:
            torch.set_num_threads(before)

    return predict


@pytest.fixture(scope="module")
def crafted() -> tuple[AttackSet, tuple[AttackAccuracy, ...], torch.nn.Module]:
    """FGSM and PGD at 2 % and 5 % of the range on the trained digits CNN's held-out digits (white-box)."""
    module = build()
    _, _, x, y = split()
    prepared = prepare({"pixels": x}, y, _torch_predict(module), RobustnessConfig(), seed=0)
    assert isinstance(prepared, AttackSet)
    made, source = craft(prepared, module, threads=1)
    return made, source, module


def test_pgd_is_at_least_as_strong_as_fgsm_and_both_hurt(
    crafted: tuple[AttackSet, tuple[AttackAccuracy, ...], torch.nn.Module],
) -> None:
    attack_set, source, _ = crafted
    assert attack_set.label_source == "data" and len(attack_set.labels) == 256
    assert (attack_set.low, attack_set.high) == (0.0, 1.0) and attack_set.eps == (0.02, 0.05)
    acc = {(r.attack, r.eps_of_range): r.accuracy for r in source}
    clean = float(np.mean(_torch_predict(crafted[2])(attack_set.clean).argmax(-1) == attack_set.labels))
    assert clean > 0.95  # a real trained classifier
    assert acc[("pgd", 0.05)] <= acc[("fgsm", 0.05)] < clean - 0.02  # the attacks really move the answer
    assert acc[("fgsm", 0.05)] <= acc[("fgsm", 0.02)]  # a larger ε hurts more
    for (attack, frac), examples in attack_set.crafted.items():  # inside the ε-ball and the valid range
        eps = frac * (attack_set.high - attack_set.low)
        assert np.abs(examples - attack_set.clean).max() <= eps + 1e-6, attack
        assert examples.min() >= 0.0 and examples.max() <= 1.0
        assert np.abs(examples - attack_set.clean).max() > eps * 0.9  # and they use the budget


def test_noise_hurts_less_than_pgd_and_simba_stays_in_the_ball(
    crafted: tuple[AttackSet, tuple[AttackAccuracy, ...], torch.nn.Module],
) -> None:
    attack_set, _, module = crafted
    predict = _torch_predict(module)
    robust = evaluate(predict, attack_set)
    for frac in (0.02, 0.05):
        pgd = robust.accuracy("pgd", frac)
        assert pgd is not None
        for attack in ("uniform", "gaussian", "simba"):
            value = robust.accuracy(attack, frac)
            assert value is not None and pgd <= value <= robust.clean_accuracy, (attack, frac)
    simba_rows = next(r for r in robust.results if r.attack == "simba" and r.eps_of_range == 0.05)
    assert simba_rows.queries is not None and simba_rows.queries > len(attack_set.labels)
    made, _ = simba(
        predict,
        attack_set.clean,
        attack_set.labels,
        0.05,
        0.0,
        1.0,
        steps=8,
        rng=np.random.default_rng(0),
    )
    assert np.abs(made - attack_set.clean).max() <= 0.05 + 1e-6
    assert int((np.abs(made - attack_set.clean) > 0).reshape(len(made), -1).sum(axis=1).max()) <= 8


def test_a_model_that_is_not_a_classifier_is_said_not_to_apply() -> None:
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    config = RobustnessConfig(examples=10)
    why = prepare({"x": x}, None, lambda rows: rows[:, :1], config, 0)
    assert isinstance(why, str) and "not class scores" in why
    ids = {"ids": np.zeros((20, 3), dtype=np.int64)}
    assert "not floating point" in str(prepare(ids, None, lambda rows: np.zeros((len(rows), 2)), config, 0))


def test_recipe_section_and_budget_are_typed_with_suggestions() -> None:
    base = {"model": "m.onnx", "data": {"eval": "e.npz"}, "budget": {"max_accuracy_drop": 0.01}}
    with pytest.raises(ConfigError) as info:
        parse_recipe({**base, "robustness": {"eps_of_rnage": [0.1], "pgd_steps": 0}})
    text = str(info.value)
    assert "unknown field 'robustness.eps_of_rnage' (did you mean 'eps_of_range'?)" in text
    assert "'robustness.pgd_steps'" in text
    with pytest.raises(ConfigError, match="did you mean 'max_robust_accuracy_drop'"):
        parse_recipe({**base, "budget": {"max_accuracy_drop": 0.01, "max_robust_accuracy_drop_": 0.1}})
    recipe = parse_recipe({**base, "robustness": {"eps_of_range": [0.1], "examples": 64}})
    assert recipe.robustness.eps_of_range == (0.1,) and recipe.budget.max_robust_accuracy_drop is None


def _robust(pgd: float) -> CandidateRobustness:
    return CandidateRobustness(
        clean_accuracy=0.95,
        results=(AttackAccuracy(attack="pgd", eps_of_range=0.05, eps=0.05, accuracy=pgd, transfer=True),),
    )


def _cand(name: str, p50: float, robust: CandidateRobustness | None) -> CandidateResult:
    metrics = CandidateMetrics(
        quality=0.95, latency_p50_ms=p50, latency_p99_ms=p50, throughput_sps=1000 / p50, size_bytes=1000
    )
    return CandidateResult(name=name, passes=("p",), status="ok", metrics=metrics, robustness=robust)


def test_select_enforces_the_robust_budget_with_a_reason() -> None:
    record = RunRecord(
        name="t", recipe={}, recipe_sha256="x", metric="accuracy", higher_is_better=True, objective="latency",
        batch_size=1, baseline=_cand("baseline", 10.0, _robust(0.80)),
        candidates=(_cand("fragile", 2.0, _robust(0.60)), _cand("sturdy", 5.0, _robust(0.79)),
                    _cand("unmeasured", 1.0, None)),
        robustness=RobustnessSummary(status="measured", eps_of_range=(0.05,), eps=(0.05,), examples=10),
    )  # fmt: skip
    sel = select(record, Budget(max_accuracy_drop=0.01, max_robust_accuracy_drop=0.05))
    assert sel.winner == "sturdy"
    reasons = {r.name: r.reason for r in sel.rejections}
    assert reasons["fragile"] == (
        "over budget: robust accuracy drop 0.2000 under pgd at ε 0.05 of the input range "
        "(transferred from the source) > 0.0500 allowed"
    )
    assert reasons["unmeasured"].startswith("robust accuracy not measured")
    assert select(record, Budget(max_accuracy_drop=0.01)).winner == "unmeasured"  # no robust budget: fastest wins
    page = render_html(record.model_copy(update={"selection": sel}))
    table = page[page.index('<table id="robustness">') :]
    table = table[: table.index("</table>")]
    assert "<td>fragile</td><td>2.000</td><td>0.950</td><td>0.600 <small>(-0.200)</small></td>" in table
    assert "unmeasured" not in table  # no measurement, no row
