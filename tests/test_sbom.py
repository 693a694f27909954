"""Issue 23 part 2: the build's CycloneDX SBOM of its environment, the container's SBOM of its lock, and inspect."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from typer.testing import CliRunner

from slipstream.artifact import Bundle
from slipstream.artifact.sbom import SBOM_FILE
from slipstream.cli import app
from slipstream.deploy import DeployOptions, export


def _valid(path: Path) -> dict[str, Any]:
    text = path.read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None  # the CycloneDX 1.6 JSON schema
    doc: dict[str, Any] = json.loads(text)
    return doc


def _libraries(doc: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["version"] for c in doc["components"] if c["type"] == "library"}


def test_the_build_writes_a_valid_sbom_of_its_environment(built_bundle_dir: Path, mlp_onnx: Path) -> None:
    bundle = Bundle.load(built_bundle_dir)
    assert SBOM_FILE in bundle.manifest.files  # listed, so hashed and signed like every other file
    doc = _valid(built_bundle_dir / SBOM_FILE)
    assert doc["metadata"]["component"]["type"] == "machine-learning-model"
    assert doc["metadata"]["component"]["name"] == bundle.manifest.name
    libraries = _libraries(doc)
    assert libraries["onnxruntime"] == metadata.version("onnxruntime")
    assert libraries["numpy"] == metadata.version("numpy")
    (source,) = [c for c in doc["components"] if c.get("bom-ref") == "source-model"]
    digest = hashlib.sha256(mlp_onnx.read_bytes()).hexdigest()
    assert source["hashes"] == [{"alg": "SHA-256", "content": digest}] and source["name"] == "mlp.onnx"
    assert bundle.manifest.source.sha256 == digest


def test_a_container_export_writes_the_sbom_of_its_lock_and_inspect_shows_both(
    built_bundle_dir: Path, tmp_path: Path
) -> None:
    wheel = tmp_path / "slipstream-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"copied, never installed here")
    out = tmp_path / "ctx"
    export(built_bundle_dir, "container", out, DeployOptions(wheel=wheel, image="registry.local/mlp:3"))
    doc = _valid(out / SBOM_FILE)
    assert (doc["metadata"]["component"]["name"], doc["metadata"]["component"]["version"]) == (
        "registry.local/mlp",
        "3",
    )
    lock = (out / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lock if line and not line.startswith("#"))
    libraries = _libraries(doc)
    assert {k: libraries[k] for k in pins} == pins  # every pinned package of the image, at its pin
    assert libraries["onnxruntime"] == metadata.version("onnxruntime") and "slipstream" in libraries
    assert "torch" not in libraries

    shown = CliRunner().invoke(app, ["inspect", str(out / "model"), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["sbom"] == str(out / "model" / SBOM_FILE)
    assert summary["image_sbom"] == str((out / SBOM_FILE).resolve())
    text = " ".join(CliRunner().invoke(app, ["inspect", str(out / "model")]).output.split())
    assert "build SBOM: /" in text and "image SBOM: /" in text  # (rich may wrap the long paths themselves)
