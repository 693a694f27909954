"""KServe: an ``InferenceService`` whose predictor runs ``slipstream serve``, and the ``ServingRuntime`` it names.

The runtime declares the ONNX model format with slipstream as its server and the Open Inference Protocol v2,
so any other bundle can use it by naming the format. The service takes the bundle (or a whole repository,
which ``slipstream serve`` reads as it is) from ``storageUri``: KServe's storage initializer copies it to
``/mnt/models``, and the server verifies every file's sha256 before a version takes traffic. Readiness is
``/v2/health/ready`` (every model loaded, verified and warmed), liveness ``/v2/health/live``; neither needs a
key. Requests are the build's tuned threads and the bundle's footprint measured at export.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import yaml

from slipstream.deploy.base import DeployOptions, DeploySource
from slipstream.deploy.resources import SERVER_BASELINE_MB, cpus_for, measure_footprint

RUNTIME_NAME = "slipstream-onnx"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts what storageUri names
API_KEYS_SECRET = "slipstream-api-keys"  # a Secret the cluster holds: key "keys", one API key per line
# storageUri schemes KServe's storage initializer understands.
STORAGE_SCHEMES = ("gs://", "s3://", "pvc://", "hdfs://", "webhdfs://", "oci://", "hf://", "https://", "http://")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$")  # KServe keeps service names to 45 characters


def service_name(source: DeploySource) -> str:
    """The InferenceService name: the model's name (or the repository's), as a DNS label."""
    raw = source.bundles[0].name if not source.repository else source.path.name
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")


class KServeDeployer:
    name: ClassVar[str] = "kserve"

    def refusals(self, source: DeploySource, options: DeployOptions) -> list[str]:
        reasons = []
        if options.storage_uri is None:
            reasons.append(
                "KServe fetches the model from a storageUri: upload the bundle (or repository) and pass "
                "--storage-uri, e.g. s3://bucket/models/digits"
            )
        elif not options.storage_uri.startswith(STORAGE_SCHEMES):
            reasons.append(
                f"storage URI '{options.storage_uri}' has a scheme KServe cannot fetch; expected one of "
                + ", ".join(STORAGE_SCHEMES)
            )
        name = service_name(source)
        if not _DNS_LABEL.match(name):
            reasons.append(
                f"'{name}' cannot name an InferenceService (a DNS label: a-z, 0-9 and '-', starting with a letter, "
                "at most 45 characters): rename the model or the repository directory"
            )
        return reasons

    def write(self, source: DeploySource, options: DeployOptions, into: Path) -> list[Path]:
        runtime = into / "servingruntime.yaml"
        service = into / "inferenceservice.yaml"
        resources = _resources(source, options)
        runtime.write_text(_dump(serving_runtime(options, resources)), encoding="utf-8")
        service.write_text(_dump(inference_service(source, options, resources)), encoding="utf-8")
        return [runtime, service]


def _dump(document: dict[str, Any]) -> str:
    header = (
        "# Written by `slipstream export --to kserve`; apply with `kubectl apply -f <this directory>` after creating\n"
        f"# the API keys' Secret: kubectl create secret generic {API_KEYS_SECRET} --from-file=keys=keys.txt\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def _resources(source: DeploySource, options: DeployOptions) -> dict[str, dict[str, str]]:
    """Requests from the build's tuned threads and the footprint measured at export; limits twice the memory."""
    cpus = max(cpus_for(item.bundle, options.cpus_per_replica) for item in source.bundles)
    if options.memory_per_replica_mb is not None:
        memory = options.memory_per_replica_mb
    else:
        # One server process holds every model: the baseline once, each model's session on top.
        footprints = [measure_footprint(item.bundle) for item in source.bundles]
        memory = sum(f.request_mb for f in footprints) - int(SERVER_BASELINE_MB * (len(footprints) - 1))
    cpu = f"{cpus:g}" if cpus >= 1 else f"{round(cpus * 1000)}m"
    return {
        "requests": {"cpu": cpu, "memory": f"{memory}Mi"},
        "limits": {"cpu": cpu, "memory": f"{2 * memory}Mi"},
    }


def _probes(port: int) -> dict[str, Any]:
    return {
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": port},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }


def serving_runtime(options: DeployOptions, resources: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The ServingRuntime: ONNX models, protocol v2, served by `slipstream serve` in the export's image."""
    container = {
        "name": "kserve-container",
        "image": options.image,
        "command": ["slipstream"],
        "args": ["serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(options.port)],  # all interfaces: a pod
        "env": [
            {"name": "SLIPSTREAM_API_KEYS", "valueFrom": {"secretKeyRef": {"name": API_KEYS_SECRET, "key": "keys"}}}
        ],
        "ports": [{"containerPort": options.port, "protocol": "TCP"}],
        **_probes(options.port),
        "resources": resources,
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": RUNTIME_NAME, "annotations": {"prometheus.kserve.io/path": "/metrics"}},
        "spec": {
            "supportedModelFormats": [{"name": "onnx", "version": "1", "autoSelect": True, "priority": 2}],
            "protocolVersions": ["v2"],
            "multiModel": False,
            "containers": [container],
        },
    }


def inference_service(
    source: DeploySource, options: DeployOptions, resources: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """The InferenceService: one predictor serving the bundle (or the whole repository) from storageUri."""
    predictor: dict[str, Any] = {}
    if options.autoscaling:
        predictor |= {"minReplicas": options.min_replicas, "maxReplicas": options.max_replicas}
        predictor |= {"scaleMetric": "concurrency", "scaleTarget": 8}
    else:
        predictor |= {"minReplicas": options.replicas, "maxReplicas": options.replicas}
    predictor["model"] = {
        "modelFormat": {"name": "onnx"},
        "protocolVersion": "v2",
        "runtime": RUNTIME_NAME,
        "storageUri": options.storage_uri,
        "resources": resources,
        **_probes(options.port),
    }
    annotations = {
        f"slipstream/{item.name}.{item.version}.model-sha256": item.bundle.model_sha256 for item in source.bundles
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": service_name(source), "annotations": annotations},
        "spec": {"predictor": predictor},
    }
