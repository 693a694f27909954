"""`slipstream export --to kserve`: manifests validated against KServe's own CRD schemas (tests/data/kserve)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from slipstream.deploy import DeployOptions, export
from slipstream.errors import ExportRefusedError

DATA = Path(__file__).parent / "data" / "kserve"


def strict(schema: Any) -> Any:
    """KServe's schema with unknown fields refused, as the API server's strict field validation does."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    # metadata is `type: object` in a CRD (the API server checks it): give it the fields written here.
    schema["properties"]["metadata"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    return schema


def validator(name: str) -> jsonschema.Draft7Validator:
    schema = strict(json.loads((DATA / name).read_text())["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


ISVC = validator("inferenceservice.v1beta1.schema.json")
RUNTIME = validator("servingruntime.v1alpha1.schema.json")


def errors(check: jsonschema.Draft7Validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in check.iter_errors(document)]


def test_the_strict_schema_catches_a_misspelled_field() -> None:
    """The validation used below can fail: a typo KServe would prune silently is an error here."""
    good = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "x"},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"}, "protocolVersion": "v2"}}},
    }
    assert errors(ISVC, good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["predictor"]["model"]["protocolVerison"] = bad["spec"]["predictor"]["model"].pop("protocolVersion")
    assert any("protocolVerison" in e for e in errors(ISVC, bad))
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["predictor"]["minReplicas"] = "two"
    assert errors(ISVC, wrong_type)


@pytest.mark.slow
def test_bundle_exports_a_valid_inference_service_and_serving_runtime(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    options = DeployOptions(storage_uri="s3://models/mlp", replicas=2, cpus_per_replica=0.5, image="reg/slip:1")
    result = export(mlp_bundle_dir, "kserve", tmp_path / "k", options)
    assert result.files == ("inferenceservice.yaml", "servingruntime.yaml")
    isvc = yaml.safe_load((tmp_path / "k" / "inferenceservice.yaml").read_text())
    runtime = yaml.safe_load((tmp_path / "k" / "servingruntime.yaml").read_text())
    assert errors(ISVC, isvc) == []
    assert errors(RUNTIME, runtime) == []
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 2)
    model = predictor["model"]
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/mlp"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert model["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert model["resources"]["requests"]["cpu"] == "500m"
    memory_mb = int(model["resources"]["requests"]["memory"].removesuffix("Mi"))
    assert memory_mb >= 160  # the serving baseline plus the measured session, with headroom
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == "reg/slip:1"
    assert container["args"][:2] == ["serve", "/mnt/models"]
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == "onnx"
    assert runtime["spec"]["protocolVersions"] == ["v2"]


def test_autoscaling_and_a_repository(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "Fleet_Repo"
    shutil.copytree(mlp_bundle_dir, repo / "mlp" / "1")
    shutil.copytree(mlp_bundle_dir, repo / "other" / "1")
    options = DeployOptions(storage_uri="pvc://models/fleet", min_replicas=1, max_replicas=4, memory_per_replica_mb=512)
    export(repo, "kserve", tmp_path / "k", options)
    isvc = yaml.safe_load((tmp_path / "k" / "inferenceservice.yaml").read_text())
    assert errors(ISVC, isvc) == []
    assert isvc["metadata"]["name"] == "fleet-repo"
    assert (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"]) == (1, 4)
    assert isvc["spec"]["predictor"]["model"]["resources"]["limits"]["memory"] == "1024Mi"
    assert len(isvc["metadata"]["annotations"]) == 2


def test_missing_or_unknown_storage_uri_is_refused_before_writing(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportRefusedError, match="storage-uri"):
        export(mlp_bundle_dir, "kserve", tmp_path / "a")
    with pytest.raises(ExportRefusedError, match="ftp://x"):
        export(mlp_bundle_dir, "kserve", tmp_path / "b", DeployOptions(storage_uri="ftp://x"))
    assert list(tmp_path.iterdir()) == []
