"""The one runner's cache for the steps that are not bundle → bundle: torch recipes and source conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slipstream.artifact import Bundle
from slipstream.passes import PassCache
from slipstream.passes.export import ImportConfig, ImportSource, import_source, source_model
from slipstream.passes.runner import PassRunner
from slipstream.passes.torch_model import TorchData, TorchModel
from slipstream.passes.torch_recipe import run_torch_recipe


@pytest.mark.slow
def test_a_torch_recipe_is_answered_by_the_cache_without_running_its_torch_passes(
    trained_cnn: TorchModel, torch_data: tuple[TorchData, TorchData], tmp_path: Path
) -> None:
    cache = PassCache(tmp_path / "cache")
    recipe = ["prune.unstructured:amount=0.3", "export"]
    first = run_torch_recipe(trained_cnn, recipe, tmp_path / "a", train=torch_data[0], cache=cache, seed=1)
    events: list[str] = []
    second = run_torch_recipe(
        trained_cnn, recipe, tmp_path / "b", train=torch_data[0], cache=cache, seed=1,
        progress=lambda e: events.append(e.step),
    )  # fmt: skip
    assert (first.cache_hits, second.cache_hits) == (0, 2)
    assert events == ["prune.unstructured@1", "export@1"]  # progress still names every step
    assert second.bundle.model_sha256 == first.bundle.model_sha256
    # The very entries of the first run (a re-run would record new times and durations), typed and in order.
    assert second.bundle.manifest.lineage == first.bundle.manifest.lineage
    assert [e.step for e in second.bundle.manifest.lineage] == ["prune.unstructured@1", "import.torch@1"]
    assert second.bundle.manifest.parity == first.bundle.manifest.parity
    assert (
        second.bundle.manifest.resolved["prune.unstructured@1"]
        == first.bundle.manifest.resolved["prune.unstructured@1"]
    )

    # Whatever the torch steps depend on is in the key: the seed, the options, the training data.
    for i, (steps, seed, train) in enumerate(
        [
            (recipe, 2, torch_data[0]),
            (["prune.unstructured:amount=0.4", "export"], 1, torch_data[0]),
            (recipe, 1, TorchData(torch_data[0].inputs[:700], torch_data[0].targets[:700])),
        ]
    ):
        again = run_torch_recipe(trained_cnn, steps, tmp_path / f"c{i}", train=train, cache=cache, seed=seed)
        assert again.cache_hits == 0, (steps, seed)


def _onnx_source(cnn_bundle: Bundle, path: Path) -> Path:
    shutil.copyfile(cnn_bundle.model_path, path)
    return path


def test_a_source_conversion_is_cached_until_the_source_changes(
    cnn_bundle: Bundle, mlp_bundle_real: Bundle, tmp_path: Path
) -> None:
    cache = PassCache(tmp_path / "cache")
    src = _onnx_source(cnn_bundle, tmp_path / "model.onnx")
    first = import_source(str(src), tmp_path / "a", name="digits", cache=cache)
    second = import_source(str(src), tmp_path / "b", name="digits", cache=cache)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.bundle.model_sha256 == first.bundle.model_sha256
    assert second.bundle.manifest.lineage == first.bundle.manifest.lineage
    assert "cache_entry" not in second.bundle.manifest.resolved
    Bundle.load(second.bundle.path)  # written and verified like any bundle

    shutil.copyfile(mlp_bundle_real.model_path, src)  # a new model at the same path
    third = import_source(str(src), tmp_path / "c", name="digits", cache=cache)
    assert not third.cache_hit and third.bundle.model_sha256 != first.bundle.model_sha256
    other_shape = import_source(str(src), tmp_path / "d", name="digits", cache=cache, input_shapes=("batch,1,8,8",))
    assert not other_shape.cache_hit  # the conversion options are part of the key


def test_an_edited_cached_bundle_is_never_returned(cnn_bundle: Bundle, tmp_path: Path) -> None:
    cache = PassCache(tmp_path / "cache")
    src = _onnx_source(cnn_bundle, tmp_path / "model.onnx")
    import_source(str(src), tmp_path / "a", name="digits", cache=cache)
    source = source_model(str(src))
    assert source is not None
    key = PassRunner().bundle_key(ImportSource(), source.sha256, ImportConfig(), "digits")
    manifest_file = cache.entry_path(key) / "manifest.json"
    doc = json.loads(manifest_file.read_text())
    doc["name"] = "someone-else"
    manifest_file.write_text(json.dumps(doc))
    assert cache.get_bundle(key, "import") is None
    assert not cache.entry_path(key).exists()  # dropped, so the next run recomputes and stores it again
    again = import_source(str(src), tmp_path / "b", name="digits", cache=cache)
    assert not again.cache_hit and again.bundle.manifest.name == "digits"


def test_a_source_that_cannot_be_hashed_is_converted_every_time() -> None:
    assert source_model("some.module:factory") is None  # no file, no loaded module: no digest, no cache
