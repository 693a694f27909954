"""The worked examples in examples/: every recipe parses and points at entry points that exist, the
tabular example runs end to end (train → convert → build → the winner answers like scikit-learn), each
example's client runs against a live server with monitoring on and prints the monitor's evaluated summary,
and a recipe's `dynamic_axes` reaches the torch export (the MiniLM example needs a dynamic sequence axis).
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import joblib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import slipstream
from slipstream.artifact import Bundle
from slipstream.build.recipe import Recipe, load_recipe, parse_recipe
from slipstream.build.search import BuildResult, run_build
from slipstream.errors import ConfigError
from slipstream.importers import import_onnx
from slipstream.monitor.config import MonitorConfig
from slipstream.monitor.profile import profile_from_bundle, write_profiled_bundle
from slipstream.monitor.store import StoreConfig
from slipstream.passes.recipe import plan
from slipstream.runtime import Engine
from slipstream.serve.background import ServerThread
from slipstream.serve.guard import hash_key
from slipstream.serve.settings import GuardSettings, MonitorServing, ServeSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RECIPES = sorted(EXAMPLES.rglob("*.yaml"))


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry_points(recipe: Recipe) -> list[str]:
    refs = [recipe.model, recipe.data.eval, recipe.data.calibration, recipe.data.train]
    return [r for r in refs if r is not None and ".py:" in r]


def _defined_names(file: Path) -> set[str]:
    """Top-level functions, classes, assignments and imported names of a file, without importing it."""
    names: set[str] = set()
    for node in ast.parse(file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_every_example_has_a_recipe_and_a_readme() -> None:
    names = {p.relative_to(EXAMPLES).as_posix() for p in RECIPES}
    assert {
        "digits-cnn.yaml",
        "minilm/minilm.yaml",
        "tabular/tabular.yaml",
        "keras/mlp.yaml",
        "keras/conv.yaml",
    } <= names
    for folder in ("minilm", "tabular", "keras"):
        readme = (EXAMPLES / folder / "README.md").read_text(encoding="utf-8")
        assert "slipstream build examples/" in readme and "slipstream serve" in readme


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_example_recipe_parses_and_its_entry_points_exist(path: Path) -> None:
    recipe = load_recipe(path)  # a stale or misspelt field fails here, naming the field
    for ref in _entry_points(recipe):
        file, _, name = ref.rpartition(":")
        assert (ROOT / file).is_file(), f"{path.name}: {ref} names a missing file"
        assert name in _defined_names(ROOT / file), f"{path.name}: {file} defines no {name!r}"
    for cand in () if recipe.candidates == "auto" else recipe.candidates:
        refs = [p if isinstance(p, str) else next(iter(p.items())) for p in cand.passes]
        plan(refs)  # every pass name and option is known (a renamed pass or option fails here)


def test_a_malformed_dynamic_axis_is_refused_before_any_work() -> None:
    raw = {"model": "m.py:build", "data": {"eval": "e.npz"}, "budget": {"max_accuracy_drop": 0.01}}
    assert parse_recipe({**raw, "dynamic_axes": ["input_ids:1=seq", "1=seq"]}).dynamic_axes == (
        "input_ids:1=seq", "1=seq",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"'dynamic_axes'.*'seq' is not of the form INPUT:AXIS=NAME"):
        parse_recipe({**raw, "dynamic_axes": ["seq"]})


# --- the tabular example, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, BuildResult]:
    """train.py → slipstream.convert(--trust-pickle) → the example recipe, re-rooted under a temp dir."""
    train = _load_module(EXAMPLES / "tabular" / "train.py")
    out = tmp_path_factory.mktemp("tabular")
    train.train(out)
    recipe = load_recipe(EXAMPLES / "tabular" / "tabular.yaml")
    default_out = "build-output/tabular"

    def moved(ref: str) -> str:
        assert ref.startswith(default_out + "/"), f"the recipe's {ref} is not where train.py writes"
        return str(out / ref.removeprefix(default_out + "/"))

    slipstream.convert(out / "model.joblib", moved(recipe.model), trust_pickle=True, sample=out / "sample.npz")
    recipe = recipe.model_copy(
        update={
            "model": moved(recipe.model),
            "data": recipe.data.model_copy(update={"eval": moved(recipe.data.eval)}),
            "output": moved(recipe.output),
            "bench_time_s": 0.2,
        }
    )
    return train, out, run_build(recipe)


def test_tabular_example_builds_a_winner_that_answers_like_scikit_learn(
    tabular: tuple[ModuleType, Path, BuildResult],
) -> None:
    _, out, result = tabular
    record = result.record
    assert [c.name for c in record.candidates] == ["fp32-optimized", "fp16"]
    assert all(c.status == "ok" for c in (record.baseline, *record.candidates))
    winner = Bundle.load(result.output / "winner")
    assert winner.manifest.parity is not None and winner.manifest.parity.status == "passed"
    model: Any = joblib.load(out / "model.joblib")
    x_test = np.load(out / "eval.npz")["input"]
    got = Engine(winner).run({"input": x_test})
    np.testing.assert_array_equal(got["label"], model.predict(x_test))
    np.testing.assert_allclose(got["probabilities"], model.predict_proba(x_test), atol=1e-3)
    assert record.baseline.metrics is not None and record.baseline.metrics.quality > 0.9


def test_tabular_groups_are_deterministic_and_both_present(tabular: tuple[ModuleType, Path, BuildResult]) -> None:
    train, out, _ = tabular
    groups = np.load(out / "groups.npy")
    x_train, _, x_test, _ = train.split()
    assert groups.tolist() == train.group_of(x_test, float(np.median(x_train[:, train.TEXTURE]))).tolist()
    counts = {g: int((groups == g).sum()) for g in ("a", "b")}
    assert sum(counts.values()) == len(x_test) and min(counts.values()) > len(x_test) // 4


# --- each example's client against a live server with monitoring on ---------------------------------------

CLIENT_KEY = "example-client-key"


def _run_client(client: Path, bundle: Path, model: str, work: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Serve ``bundle`` as ``model`` (API key, --monitor-db), run the example's client as a subprocess against
    it, and return what the client printed and the monitor's latest evaluation (the one the client asked for)."""
    repo = work / "repo"
    shutil.copytree(bundle, repo / model / "1")
    keys = work / "keys.txt"
    keys.write_text(CLIENT_KEY + "\n")
    settings = ServeSettings(
        port=0,
        access_log=False,
        guard=GuardSettings(api_key_hashes=frozenset({hash_key(CLIENT_KEY)})),
        monitor=MonitorServing(
            store=StoreConfig(path=work / "monitor.db"), config=MonitorConfig(evaluate_interval_s=3600.0)
        ),
    )
    with ServerThread(repo, settings) as server:
        run = subprocess.run(
            [sys.executable, str(client), "--url", server.url, "--key-file", str(keys), *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        latest = httpx.get(
            f"{server.url}/v2/models/{model}/monitoring", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ).json()
    return run.stdout, latest


def _firing(doc: dict[str, Any]) -> list[str]:
    return [a["rule"] for a in doc["alerts"] if a["state"] == "firing"]


def test_tabular_client_prints_the_evaluated_summary(
    tabular: tuple[ModuleType, Path, BuildResult], tmp_path: Path
) -> None:
    _, out, result = tabular
    printed, latest = _run_client(
        EXAMPLES / "tabular" / "client.py", result.output / "winner", "breast-cancer", tmp_path, "--data", str(out)
    )
    rows = len(np.load(out / "groups.npy"))
    assert f"{rows} requests, accuracy" in printed and f"{rows} labels sent back" in printed
    assert "null" not in printed  # the summary is evaluated after this client's traffic and labels
    assert latest["requests"] == rows and latest["quality"]["labeled"] == rows  # what the client asked for
    accuracy = latest["quality"]["realized"]["accuracy"]
    assert f"accuracy {accuracy:.3f} on {rows} labeled rows" in printed
    fairness = latest["fairness"]
    assert {g["group"] for g in fairness["groups"]} == {"a", "b"}
    for group in fairness["groups"]:
        assert f"group {group['group']}: {group['rows']} rows, selection rate {group['selection_rate']:.3f}" in printed
    assert fairness["gaps"] and all(gap["reason"] in printed for gap in fairness["gaps"])  # with their intervals
    assert any("interval" in gap["reason"] for gap in fairness["gaps"])
    assert f"drift ({rows} rows" in printed
    assert f"alerts firing: {len(_firing(latest))}" in printed
    assert all(f"  {rule}: " in printed for rule in _firing(latest))


def token_embedder(vocab: int = 30522, dim: int = 32, seed: int = 0) -> onnx.ModelProto:
    """MiniLM's interface (int64 ``input_ids`` and ``attention_mask`` [batch, seq] → unit vectors [batch, dim])
    at a fraction of its cost: a random token embedding, mean-pooled over the mask and L2-normalized. The real
    MiniLM export is tested in test_importers_minilm.py; here only the client and the server are under test."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1e-6], np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["embedded", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "eps"], ["safe_count"]),
        helper.make_node("Div", ["summed", "safe_count"], ["mean"]),
        helper.make_node("LpNormalization", ["mean"], ["sentence_embedding"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "token_embedder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_minilm_client_prints_embeddings_and_the_evaluated_summary(tmp_path: Path) -> None:
    example = _load_module(EXAMPLES / "minilm" / "model.py")
    onnx.save_model(token_embedder(), str(tmp_path / "embedder.onnx"))
    source = import_onnx(tmp_path / "embedder.onnx", tmp_path / "source", name="minilm").path
    batches = list(example.eval_data())  # the example's sentences, as its recipe profiles them (32 tokens)
    reference = {k: np.concatenate([b[k] for b in batches]) for k in ("input_ids", "attention_mask")}
    bundle = write_profiled_bundle(source, tmp_path / "bundle", profile_from_bundle(source, reference))
    sentences = example.SENTENCES[:40]
    printed, latest = _run_client(EXAMPLES / "minilm" / "client.py", bundle, "minilm", tmp_path, *sentences)
    assert f"{len(sentences)} embeddings of size 32; cosine similarities:" in printed
    assert latest["requests"] == 1 and latest["rows"] == len(sentences) and latest["observe_errors"] == 0
    assert "monitor: 1 requests observed" in printed
    assert "quality: no labels" in printed and "fairness: none" in printed
    assert latest["drift"]["judged"] and f"drift ({len(sentences)} rows" in printed
    assert f"alerts firing: {len(_firing(latest))}" in printed


# --- a recipe's dynamic_axes reach the torch export -----------------------------------------------------

TWO_INPUT_MODEL = """
import torch
from torch import nn


class Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return (self.embed(input_ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def build() -> nn.Module:
    torch.manual_seed(0)
    return Pool().eval()


def example_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[3, 4, 5], [6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
"""


def test_recipe_dynamic_axes_make_the_sequence_axis_dynamic(tmp_path: Path) -> None:
    (tmp_path / "pool.py").write_text(textwrap.dedent(TWO_INPUT_MODEL))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(16, 6), dtype=np.int64)
    np.savez(tmp_path / "eval.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    recipe = parse_recipe(
        {
            "name": "pool",
            "model": f"{tmp_path / 'pool.py'}:build",
            "dynamic_axes": ["1=seq"],
            "data": {"eval": str(tmp_path / "eval.npz")},
            "metric": "cosine",
            "budget": {"max_accuracy_drop": 0.01},
            "batch_size": 4,
            "bench_time_s": 0.2,
            "candidates": [{"name": "fp32-optimized", "passes": ["graph.optimize"]}],
            "output": str(tmp_path / "out"),
        }
    )
    result = run_build(recipe)
    shapes = [(s.name, s.shape) for s in result.winner.manifest.inputs]
    assert shapes == [("input_ids", ("batch", "seq")), ("attention_mask", ("batch", "seq"))]
    engine = Engine(result.winner)
    for length in (2, 9):  # neither is the export's example length (3) nor the evaluation's (6)
        feeds = {"input_ids": rng.integers(1, 50, size=(3, length)), "attention_mask": np.ones((3, length), np.int64)}
        assert engine.run(feeds)[result.winner.manifest.outputs[0].name].shape == (3, 8)


def test_minilm_eval_data_is_tokenized_real_sentences_at_32_tokens() -> None:
    example = _load_module(EXAMPLES / "minilm" / "model.py")
    batches = list(example.eval_data())
    assert len(set(example.SENTENCES)) == len(example.SENTENCES) >= 100
    assert [b["input_ids"].shape for b in batches][:1] == [(32, 32)]
    assert sum(len(b["input_ids"]) for b in batches) == len(example.SENTENCES)
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].dtype == np.int64 and b["attention_mask"].dtype == np.int64
        assert (b["input_ids"][:, 0] == 101).all()  # [CLS] first: real tokenizer output, not random ids
        assert b["attention_mask"].sum(1).min() > 0 and b["attention_mask"].sum(1).max() < 32  # none truncated
    examples = example.example_inputs()
    assert list(examples) == ["input_ids", "attention_mask"] and examples["input_ids"].shape[0] == 2
