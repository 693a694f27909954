"""The Ray Serve target: the export checked against Ray's own config schema, then run live.

The live part starts a local two-node Ray cluster (``ray.cluster_utils.Cluster``, one CPU per node) once per
session, runs the exported application exactly as a user would (``serve run serve_config.yaml --working-dir
DIR``), and calls it through Ray's HTTP proxy with the protocol's own clients: JSON, and tritonclient's binary
tensors, with API keys on. Then it kills one replica's actor and shows the next requests still succeed.
Ray is imported plainly: if it cannot start, these tests fail, they never skip.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import ray
import yaml
from click.testing import CliRunner
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.schema import ServeDeploySchema
from ray.serve.scripts import cli as serve_cli

from slipstream.artifact import Bundle
from slipstream.artifact.bundle import write_bundle
from slipstream.deploy import DeployOptions, export
from slipstream.deploy.ray import CONFIG_FILE, MODULE_FILE, RayAppArgs
from slipstream.deploy.ray_replica import check_models, monitor_path, replica_settings
from slipstream.errors import BundleError, ConfigError, ExportRefusedError
from slipstream.importers import import_onnx
from slipstream.serve.background import free_port
from slipstream.serve.guard import API_KEYS_ENV, Guard
from tests.serve_support import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _tuned(bundle: Bundle, dest: Path, threads: int) -> Bundle:
    """A copy of ``bundle`` as a build leaves it: its tuned intra-op threads recorded in resolved["session"]."""
    resolved = {**bundle.manifest.resolved, "session": {"intra_op_threads": threads}}
    return write_bundle(dest, bundle.load_model(), bundle.manifest.model_copy(update={"resolved": resolved}))


def _config(out: Path) -> dict[str, Any]:
    doc = yaml.safe_load((out / CONFIG_FILE).read_text())
    ServeDeploySchema.model_validate(doc)  # Ray's own schema: an unknown or misspelled field fails here
    return dict(doc)


# -- the export (no cluster) ------------------------------------------------------------------------------
def test_export_is_a_serve_config_ray_accepts(mlp_bundle: Bundle, tmp_path: Path) -> None:
    tuned = _tuned(mlp_bundle, tmp_path / "tuned", threads=3)
    result = export(tuned.path, "ray", tmp_path / "app", DeployOptions(replicas=2, port=8123, max_batch_size=16))
    assert {CONFIG_FILE, MODULE_FILE, "model/manifest.json", "model/model.onnx"} <= set(result.files)
    doc = _config(tmp_path / "app")
    assert doc["http_options"] == {"host": "0.0.0.0", "port": 8123}
    (app,) = doc["applications"]
    assert app["import_path"] == "slipstream_app:app" and "runtime_env" not in app
    (deployment,) = app["deployments"]
    assert deployment["num_replicas"] == 2 and "autoscaling_config" not in deployment
    assert deployment["ray_actor_options"] == {"num_cpus": 3.0}  # the build's tuned threads
    assert deployment["max_ongoing_requests"] == 32  # two batches in flight per replica
    args = RayAppArgs.model_validate(app["args"])
    assert [(m.name, m.version, m.model_sha256) for m in args.models] == [("mlp", "1", tuned.model_sha256)]
    assert args.settings.batching.max_batch_size == 16
    # Unset at export, so each replica applies the bundle's tuned threads as `slipstream serve` does.
    assert "intra_op_threads" not in args.settings.model_fields_set
    assert Bundle.load(tmp_path / "app" / "model").model_sha256 == tuned.model_sha256


def test_autoscaling_memory_and_a_remote_working_dir(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    options = DeployOptions(
        min_replicas=1, max_replicas=4, cpus_per_replica=0.5, memory_per_replica_mb=512, storage_uri="s3://b/app.zip"
    )
    export(mlp_bundle_dir, "ray", tmp_path / "app", options)
    (app,) = _config(tmp_path / "app")["applications"]
    (deployment,) = app["deployments"]
    assert "num_replicas" not in deployment
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}
    assert deployment["ray_actor_options"] == {"num_cpus": 0.5, "memory": 512 * 2**20}
    assert app["runtime_env"] == {"working_dir": "s3://b/app.zip"}


def test_a_repository_travels_whole_and_every_version_is_checked(mlp_bundle: Bundle, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _tuned(mlp_bundle, repo / "digits" / "1", threads=1)
    _tuned(mlp_bundle, repo / "digits" / "2", threads=2)
    _tuned(mlp_bundle, repo / "other" / "7", threads=1)
    result = export(repo, "ray", tmp_path / "app", DeployOptions())
    assert result.models == ("digits/1", "digits/2", "other/7")
    (app,) = _config(tmp_path / "app")["applications"]
    assert app["deployments"][0]["ray_actor_options"] == {"num_cpus": 2.0}  # the most any model was tuned to
    args = RayAppArgs.model_validate(app["args"])
    assert args.root == "repository" and len(args.models) == 3
    check_models(tmp_path / "app" / "repository", args)
    shutil.rmtree(tmp_path / "app" / "repository" / "other")  # a version gone from the application
    with pytest.raises(BundleError, match="other/7"):
        check_models(tmp_path / "app" / "repository", args)


def test_refused_before_anything_is_written(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])  # a fixed batch: cannot batch
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "fixed", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    fixed = import_onnx(tmp_path / "f.onnx", tmp_path / "fixed")
    options = DeployOptions(batching=True, storage_uri="s3://bucket/app", monitor_db="mysql://db/log")
    with pytest.raises(ExportRefusedError) as caught:
        export(fixed.path, "ray", tmp_path / "app", options)
    assert len(caught.value.reasons) == 3
    assert "scheme 'mysql://'" in caught.value.reasons[0]
    assert "'s3://bucket/app'" in caught.value.reasons[1] and "cannot batch" in caught.value.reasons[2]
    assert not (tmp_path / "app").exists() and not list(tmp_path.glob(".app.*"))


def test_a_replica_refuses_bundles_other_than_the_exported_ones(mlp_bundle: Bundle, tmp_path: Path) -> None:
    export(mlp_bundle.path, "ray", tmp_path / "app", DeployOptions())
    args = RayAppArgs.model_validate(_config(tmp_path / "app")["applications"][0]["args"])
    check_models(tmp_path / "app" / "model", args)  # the exported bundle passes
    other = _tuned(mlp_bundle, tmp_path / "other", threads=2)  # same model name and version, another manifest
    swapped = args.model_copy(update={"models": (args.models[0].model_copy(update={"model_sha256": "0" * 64}),)})
    with pytest.raises(BundleError, match=r"expected the exported models mlp/1 \(000000000000\)"):
        check_models(other.path, swapped)


def test_the_exported_app_carries_the_fleets_store_to_every_replica(mlp_bundle: Bundle, tmp_path: Path) -> None:
    shared = "postgresql://slipstream@db:5432/monitor"
    export(mlp_bundle.path, "ray", tmp_path / "app", DeployOptions(monitor_db=shared))
    args = RayAppArgs.model_validate(_config(tmp_path / "app")["applications"][0]["args"])
    assert args.monitor_db == shared


def test_replica_settings_take_keys_from_the_node_and_share_a_postgresql_store() -> None:
    models = [{"name": "m", "version": "1", "model_sha256": "x"}]
    args = RayAppArgs.model_validate({"root": "model", "models": models, "settings": {"host": "0.0.0.0"}})
    keyed = replica_settings(args, {API_KEYS_ENV: API_KEY}, "r1")
    assert len(keyed.guard.api_key_hashes) == 1 and API_KEY not in str(keyed.model_dump())
    with pytest.raises(ConfigError, match="Give keys"):  # exposed through Ray's proxy: no keys, no start
        Guard(replica_settings(args, {}, "r1").guard, host="0.0.0.0")
    assert monitor_path("/data/log.sqlite", "r1") == Path("/data/log.r1.sqlite")
    monitored = replica_settings(
        args.model_copy(update={"monitor_db": "/data/log.sqlite"}), {API_KEYS_ENV: API_KEY}, "r2"
    )
    assert monitored.monitor.store is not None and monitored.monitor.store.path == Path("/data/log.r2.sqlite")
    shared = "postgresql://slipstream@db:5432/monitor?sslmode=require"  # one store for the fleet, TLS via the DSN
    assert monitor_path(shared, "r1") == monitor_path(shared, "r2") == shared
    fleet = replica_settings(args.model_copy(update={"monitor_db": shared}), {API_KEYS_ENV: API_KEY}, "r1")
    assert fleet.monitor.store is not None and fleet.monitor.store.url == shared
    with pytest.raises(ConfigError, match="carries a password"):
        monitor_path("postgresql://user:pw@db/monitor", "r1")
    with pytest.raises(ConfigError, match="scheme 'mysql://'"):
        monitor_path("mysql://db/monitor", "r1")


# -- live: a two-node cluster, the exported application, clients through Ray's proxy ----------------------
# Module-scoped: one cluster for the whole session (only this module uses one), stopped as soon as the module
# is done rather than idling beside every later test.
@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes with one CPU each; the replicas' API key is in the nodes' environment, as on a real cluster."""
    with pytest.MonkeyPatch.context() as env:  # only while the nodes start: this process's tests never see it
        env.setenv(API_KEYS_ENV, API_KEY)  # raylets, and the workers they start, inherit it
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        started = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            started.add_node(num_cpus=1)
        except BaseException:
            started.shutdown()
            raise
    try:
        started.wait_for_nodes()
        yield started
    finally:
        serve.shutdown()
        ray.shutdown()
        started.shutdown()


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, mlp_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Bundle]:
    """The exported application with 2 replicas (one CPU each: one per node), run with Ray's own `serve run`."""
    work = tmp_path_factory.mktemp("ray")
    bundle = _tuned(mlp_bundle, work / "bundle", threads=1)
    port = free_port()
    out = work / "app"
    export(bundle.path, "ray", out, DeployOptions(replicas=2, port=port))
    argv = ["run", str(out / CONFIG_FILE), "--working-dir", str(out), "--address", cluster.address, "--non-blocking"]
    ran = CliRunner().invoke(serve_cli, argv)
    assert ran.exit_code == 0, ran.output
    deadline = time.monotonic() + 120
    while True:
        app = serve.status().applications.get("slipstream")
        if app is not None and app.status == "RUNNING":
            break
        assert app is None or app.status != "DEPLOY_FAILED", app.message if app else ""
        assert time.monotonic() < deadline, f"the application did not start in 120 s: {app}"
        time.sleep(0.25)
    return f"127.0.0.1:{port}", bundle


def _replicas() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"])


def _reference(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"pixels": x})[0])


@pytest.mark.slow
def test_json_and_binary_tensors_through_the_proxy_with_auth(deployed: tuple[str, Bundle]) -> None:
    import tritonclient.http as httpclient

    address, bundle = deployed
    assert serve.status().applications["slipstream"].deployments["slipstream"].replica_states == {"RUNNING": 2}
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [3, 8], "data": x.ravel().tolist()}]}
    with httpx.Client(base_url=f"http://{address}", timeout=30) as client:
        refused = client.post("/v2/models/mlp/infer", json=body)
        assert refused.status_code == 401, refused.text  # the guard runs in the replica, behind Ray's proxy
        answer = client.post("/v2/models/mlp/infer", json=body, headers=AUTH)
        assert answer.status_code == 200, answer.text
        (out,) = answer.json()["outputs"]
        np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), _reference(bundle, x), rtol=1e-5)
        metrics = client.get("/metrics", headers=AUTH).text
        assert "slipstream_requests_total" in metrics  # slipstream's own metrics, from whichever replica answered

    triton = httpclient.InferenceServerClient(url=address)
    tensor = httpclient.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    wanted = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    result = triton.infer("mlp", [tensor], outputs=[wanted], headers=dict(AUTH))  # it adds its own headers
    np.testing.assert_allclose(result.as_numpy("probabilities"), _reference(bundle, x), rtol=1e-5)
    triton.close()


@pytest.mark.slow
def test_killing_a_replica_does_not_fail_the_next_requests(deployed: tuple[str, Bundle]) -> None:
    address, bundle = deployed
    before = _replicas()
    assert len(before) == 2
    x = np.ones((1, 8), dtype=np.float32)
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": x.ravel().tolist()}]}
    expected = _reference(bundle, x)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    statuses: list[int] = []
    with httpx.Client(base_url=f"http://{address}", timeout=30, headers=AUTH) as client:
        for _ in range(100):
            answer = client.post("/v2/models/mlp/infer", json=body)
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                np.testing.assert_allclose(answer.json()["outputs"][0]["data"], expected.ravel(), rtol=1e-5)
    assert statuses == [200] * 100, f"non-200 answers after the kill: {sorted(set(statuses))}"
    # Ray's controller replaces the killed replica; the fleet is back to two.
    deadline = time.monotonic() + 60
    while not (len(after := _replicas()) == 2 and before[0] not in after):
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {after}"
        time.sleep(0.25)
