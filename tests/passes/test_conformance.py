"""One suite over every catalogue entry (ONNX passes, torch passes, export), on small trained digits models.

Every pass, whatever its kind, goes through the one runner and is held to the same checks: its config
round-trips through JSON, its input is untouched, its lineage grows by exactly one typed entry, it is
deterministic under a seed, and its outputs on real data stay within the tolerance the pass declares.
The last check is shown to catch wrong outputs with test doubles of plugins (passes written here that
corrupt weights while claiming a tight tolerance), run by the same runner and checked by the same code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slipstream.artifact import Bundle
from slipstream.artifact.manifest import LineageEntry
from slipstream.passes import CATALOGUE, load_pass, lookup
from slipstream.passes.base import AnyPass, OnnxPass, PassConfig, PassContext, PassOutput, PassWarning
from slipstream.passes.runner import PassRunner
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_base import TorchContext, TorchPass, TorchPassOutput, weights_digest
from slipstream.passes.torch_model import TorchData, TorchModel
from slipstream.runtime import Engine
from tests.passes.helpers import run_pass, tree_bytes

ALL = sorted(CATALOGUE)
ONNX = [n for n in ALL if CATALOGUE[n].input_kind == "onnx"]
TORCH = [n for n in ALL if CATALOGUE[n].input_kind == "torch" and CATALOGUE[n].output_kind == "torch"]
EXPORT = [n for n in ALL if CATALOGUE[n].input_kind == "torch" and CATALOGUE[n].output_kind == "onnx"]

# The settings the declared tolerances are promised at: real work on the small models, where a default
# would be a no-op (binarize's size floor) or there is no default (the pruning amounts).
OPTIONS: dict[str, dict[str, object]] = {
    "weights.binarize": {"min_elements": 512},
    "quantize.static": {"num_samples": 32},
    "quantize.nncf": {"num_samples": 32},
    "prune.structured": {"amount": 0.25},
    "prune.unstructured": {"amount": 0.3},
    "train.finetune": {"epochs": 1, "batch_size": 128, "distill_alpha": 0.5},  # the teacher path too
    "train.distill": {"steps": 4, "batch_size": 128},
}


@dataclass(frozen=True)
class Outcome:
    """What the suite checks of one pass, whatever its kind."""

    input_before: object  # the input's bytes (a bundle) or weights digest (a torch model) before the runs
    input_after: object
    lineage_before: tuple[LineageEntry, ...]
    lineage_after: tuple[LineageEntry, ...]
    input_digest: str | None  # what the new lineage entry must name as its input
    output_digest: str  # ... and as its output
    first_output: str  # a digest of each run's model, for determinism
    second_output: str
    want: dict[str, np.ndarray]  # the input model's outputs on real data
    got: dict[str, np.ndarray]  # the output model's


def bundle_outputs(bundle: Bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    return Engine(bundle).run({bundle.manifest.inputs[0].name: x})


def torch_outputs(model: TorchModel, x: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    model.module.eval()
    with torch.no_grad():
        return {"logits": model.module(torch.from_numpy(x)).numpy()}


def onnx_outcome(p: AnyPass, bundle: Bundle, root: Path, options: object, x: np.ndarray) -> Outcome:
    before = tree_bytes(bundle.path)
    config = p.make_config(options)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PassWarning)  # advice (e.g. "slower on this CPU"), not conformance
        runs = [PassRunner(seed=7).run_onnx(p, bundle, root / f"{p.name}-{i}", config, overwrite=False) for i in (1, 2)]
    first, second = (Bundle.load(r.bundle.path) for r in runs)
    return Outcome(
        before, tree_bytes(bundle.path), bundle.manifest.lineage, first.manifest.lineage, bundle.model_sha256,
        first.model_sha256, first.model_sha256, second.model_sha256, bundle_outputs(bundle, x),
        bundle_outputs(first, x),
    )  # fmt: skip


def torch_outcome(p: AnyPass, model: TorchModel, runner: PassRunner, options: object, x: np.ndarray) -> Outcome:
    before = weights_digest(model.module)
    config = p.make_config(options)  # type: ignore[arg-type]
    first, second = (runner.run_torch(p, model, config) for _ in range(2))
    return Outcome(
        before, weights_digest(model.module), tuple(s.lineage_entry() for s in model.steps),
        tuple(s.lineage_entry() for s in first.steps), before, weights_digest(first.module),
        weights_digest(first.module), weights_digest(second.module), torch_outputs(model, x), torch_outputs(first, x),
    )  # fmt: skip


def export_outcome(p: AnyPass, model: TorchModel, root: Path, x: np.ndarray) -> Outcome:
    before = weights_digest(model.module)
    runs = [
        PassRunner().run_to_bundle(p, lambda: model, "unused", root / f"{p.name}-{i}", name="digits") for i in (1, 2)
    ]
    first, second = (r.bundle for r in runs)
    got = bundle_outputs(first, x)
    return Outcome(
        before, weights_digest(model.module), tuple(s.lineage_entry() for s in model.steps), first.manifest.lineage,
        None, first.model_sha256, first.model_sha256, second.model_sha256, torch_outputs(model, x),
        {"logits": next(iter(got.values()))},
    )  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(
    cnn_bundle: Bundle,
    trained_cnn: TorchModel,
    torch_data: tuple[TorchData, TorchData],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Outcome]:
    """Every catalogue entry, run twice by the runner without a cache (so determinism is the pass's own)."""
    root = tmp_path_factory.mktemp("conformance")
    x = torch_data[1].inputs
    found: dict[str, Outcome] = {}
    for name in ONNX:
        found[name] = onnx_outcome(load_pass(lookup(name)), cnn_bundle, root, OPTIONS.get(name), x)
    runner = PassRunner(seed=3, train=torch_data[0], eval=torch_data[1], teacher=trained_cnn.module)
    for name in TORCH:
        found[name] = torch_outcome(load_pass(lookup(name)), trained_cnn, runner, OPTIONS.get(name), x)
    # export a model that already carries a torch step: its lineage must come along, typed
    pruned = runner.run_torch(load_pass(lookup("prune.unstructured")), trained_cnn, _cfg("prune.unstructured"))
    for name in EXPORT:
        found[name] = export_outcome(load_pass(lookup(name)), pruned, root, x)
    return found


def _cfg(name: str) -> PassConfig:
    return load_pass(lookup(name)).make_config(OPTIONS.get(name))


def test_the_suite_covers_the_whole_catalogue() -> None:
    assert sorted([*ONNX, *TORCH, *EXPORT]) == ALL
    assert TORCH == ["prune.structured", "prune.unstructured", "train.distill", "train.finetune"]
    assert EXPORT == ["export"]


@pytest.mark.parametrize("name", ALL)
def test_config_round_trips_through_json(name: str) -> None:
    instance = load_pass(lookup(name))
    config = instance.make_config(OPTIONS.get(name))
    again = type(config).model_validate_json(config.model_dump_json())
    assert again == config
    assert instance.config_hash(again) == instance.config_hash(config)
    for field_name, field in type(config).model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"


@pytest.mark.parametrize("name", ALL)
def test_every_pass_declares_its_tolerance(name: str) -> None:
    tolerance = load_pass(lookup(name)).tolerance
    assert tolerance is not None and (tolerance.max_rel_error is not None or tolerance.min_top1 is not None)


@pytest.mark.parametrize("name", ALL)
def test_outputs_stay_within_the_declared_tolerance(name: str, outcomes: dict[str, Outcome]) -> None:
    run = outcomes[name]
    tolerance = load_pass(lookup(name)).tolerance
    assert tolerance is not None
    assert tolerance.problems(run.want, run.got) == []


@pytest.mark.parametrize("name", ALL)
def test_input_is_untouched(name: str, outcomes: dict[str, Outcome]) -> None:
    assert outcomes[name].input_after == outcomes[name].input_before


@pytest.mark.parametrize("name", ALL)
def test_lineage_grows_by_exactly_one_typed_entry(name: str, outcomes: dict[str, Outcome]) -> None:
    run = outcomes[name]
    instance = load_pass(lookup(name))
    assert run.lineage_after[:-1] == run.lineage_before
    entry = run.lineage_after[-1]
    assert isinstance(entry, LineageEntry)
    assert entry.step == instance.lineage_name
    assert entry.input_sha256 == run.input_digest
    assert entry.output_sha256 == run.output_digest
    if name not in EXPORT:  # the export's entry is the importer's, with the importer's own settings
        assert entry.config == instance.make_config(OPTIONS.get(name)).model_dump(mode="json")


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_a_seed(name: str, outcomes: dict[str, Outcome]) -> None:
    assert outcomes[name].first_output == outcomes[name].second_output


@pytest.mark.parametrize("name", ONNX)
def test_onnx_output_passes_the_checker_and_keeps_its_interface(name: str, cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(cnn_bundle, name, tmp_path / "o", OPTIONS.get(name), seed=7)
    onnx.checker.check_model(onnx.load(str(run.bundle.model_path)), full_check=False)
    assert run.bundle.manifest.inputs == cnn_bundle.manifest.inputs
    assert run.bundle.manifest.outputs == cnn_bundle.manifest.outputs
    metrics = run.bundle.manifest.metrics[name]
    assert isinstance(metrics, dict) and metrics["size_bytes_out"] == run.bundle.model_path.stat().st_size
    assert set(metrics["fidelity"]["outputs"]) == {"logits"}  # type: ignore[call-overload,index]


def test_a_pass_run_writes_only_its_output(cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in run.bundle.path.iterdir()) == ["manifest.json", "model.onnx"]


# -- the check catches wrong outputs -------------------------------------------------------------------


class NoisyConfig(PassConfig):
    scale: float = 0.02


class NoisyFusion(OnnxPass[NoisyConfig]):
    """A plugin that claims fusion-level fidelity but adds 2 % noise to every weight."""

    name = "test.noisy_fusion"
    version = 1
    Config = NoisyConfig
    tolerance: ClassVar[Tolerance | None] = Tolerance(max_rel_error=1e-5)

    def apply(self, model: onnx.ModelProto, config: NoisyConfig, ctx: PassContext) -> PassOutput:
        rng = np.random.default_rng(ctx.seed)
        for init in model.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.dtype == np.float32:
                noisy = w * (1 + config.scale * rng.standard_normal(w.shape)).astype(np.float32)
                init.CopyFrom(numpy_helper.from_array(noisy, init.name))
        return PassOutput(model=model)


class ShuffledInt8(OnnxPass[NoisyConfig]):
    """A plugin that claims int8-level fidelity but permutes the classifier's rows (wrong classes)."""

    name = "test.shuffled_int8"
    version = 1
    Config = NoisyConfig
    tolerance: ClassVar[Tolerance | None] = Tolerance(max_rel_error=0.2, min_top1=0.95)

    def apply(self, model: onnx.ModelProto, config: NoisyConfig, ctx: PassContext) -> PassOutput:
        last = [i for i in model.graph.initializer if numpy_helper.to_array(i).shape[:1] == (10,)]
        for init in last:  # the output layer's weight and bias: class k now scores as class k+1
            init.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(init), 1, axis=0), init.name))
        return PassOutput(model=model)


class ScaledFinetune(TorchPass[NoisyConfig]):
    """A torch plugin that claims fine-tuning's fidelity but negates the output layer."""

    name = "test.negated_finetune"
    version = 1
    Config = NoisyConfig
    tolerance: ClassVar[Tolerance | None] = Tolerance(min_top1=0.9)

    def apply(self, model: TorchModel, config: NoisyConfig, ctx: TorchContext) -> TorchPassOutput:
        import torch

        out = model.copy()
        last = [m for m in out.module.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(-1.0)
        return TorchPassOutput(out)


@pytest.mark.parametrize("plugin", [NoisyFusion, ShuffledInt8])
def test_the_tolerance_check_catches_a_wrong_onnx_pass(
    plugin: type[AnyPass], cnn_bundle: Bundle, torch_data: tuple[TorchData, TorchData], tmp_path: Path
) -> None:
    outcome = onnx_outcome(plugin(), cnn_bundle, tmp_path, None, torch_data[1].inputs)
    assert outcome.got["logits"].shape == outcome.want["logits"].shape  # a shape check would pass it
    assert plugin.tolerance is not None
    problems = plugin.tolerance.problems(outcome.want, outcome.got)
    assert problems and all("output 'logits'" in p for p in problems)


def test_the_tolerance_check_catches_a_wrong_torch_pass(
    trained_cnn: TorchModel, torch_data: tuple[TorchData, TorchData]
) -> None:
    plugin = ScaledFinetune()
    outcome = torch_outcome(plugin, trained_cnn, PassRunner(seed=3), None, torch_data[1].inputs)
    assert outcome.input_after == outcome.input_before  # everything else about it conforms
    assert plugin.tolerance is not None
    problems = plugin.tolerance.problems(outcome.want, outcome.got)
    assert len(problems) == 1 and "top-1 agreement" in problems[0]


def test_tolerance_lists_every_problem_and_demands_a_declaration() -> None:
    want = {"a": np.eye(4, dtype=np.float32), "b": np.ones((2, 3), np.float32), "ids": np.arange(3)}
    got = {"a": np.eye(4, dtype=np.float32)[::-1], "b": np.full((2, 3), np.nan, np.float32), "ids": np.arange(3)}
    problems = Tolerance(max_rel_error=1e-5, min_top1=0.9).problems(want, got)
    assert len(problems) == 3  # a: error and agreement; b: non-finite; integer outputs are not compared
    assert Tolerance().problems(want, want) == ["the pass declares no tolerance"]
    assert Tolerance(max_rel_error=0.0, min_top1=1.0).problems(want, {"a": want["a"]}) == [
        "output 'b' is missing",
        "output 'ids' is missing",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX)
def test_every_onnx_pass_runs_on_a_transformer_export(name: str, transformer_bundle: Bundle, tmp_path: Path) -> None:
    """The same passes on a dynamo-exported nn.TransformerEncoder (dynamic batch and sequence)."""
    options: dict[str, object] | None = None
    if name in ("quantize.static", "quantize.nncf"):  # token inputs: calibration needs data (no generated ids)
        np.savez(tmp_path / "ids.npz", input_ids=np.random.default_rng(1).integers(0, 50, size=(16, 13)))
        options = {"num_samples": 16, "data": str(tmp_path / "ids.npz")}
    run, _ = run_pass(transformer_bundle, name, tmp_path / "o", options)
    onnx.checker.check_model(onnx.load(str(run.bundle.model_path)), full_check=False)
    ids = np.random.default_rng(0).integers(0, 50, size=(3, 13)).astype(np.int64)
    got = Engine(run.bundle).run({"input_ids": ids})["pooled"]
    want = Engine(transformer_bundle).run({"input_ids": ids})["pooled"]
    assert got.shape == want.shape == (3, 32)
    assert np.isfinite(got).all()
