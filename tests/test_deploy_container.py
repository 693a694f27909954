"""`slipstream export --to container`: the build context, and the image's contents serving from a fresh venv.

The slow test installs exactly what the Dockerfile installs (its `pip install` line, run as written against
the export's lock and wheel) into a new venv, runs the image's entrypoint against the exported bundle, and gets
an inference answer over HTTP; torch and TensorFlow are not importable there. Where a container engine runs,
the `container` test builds and runs the image itself.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slipstream.artifact import Bundle
from slipstream.artifact.bundle import write_bundle
from slipstream.deploy import DeployOptions, export
from slipstream.errors import ExportRefusedError


@pytest.fixture(scope="session")
def container_export(mlp_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("container") / "ctx"
    export(mlp_bundle_dir, "container", out)
    return out


@pytest.mark.slow  # the session fixture builds slipstream's wheel with pip (about 5-20 s)
def test_build_context(container_export: Path, mlp_bundle_dir: Path) -> None:
    dockerfile = (container_export / "Dockerfile").read_text()
    assert dockerfile.splitlines()[3] == "FROM python:3.11-slim"
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/v2/health/ready" in dockerfile
    assert "pip install --no-deps -r /tmp/requirements.lock" in dockerfile
    lock = (container_export / "requirements.lock").read_text()
    pins = dict(line.split("==") for line in lock.splitlines() if line and not line.startswith("#"))
    assert {"onnxruntime", "fastapi", "uvicorn", "scipy", "orjson", "prometheus-client"} <= set(pins)
    assert not {"torch", "tensorflow", "tensorflow-cpu", "keras", "scikit-learn", "transformers"} & set(pins)
    import onnxruntime

    assert pins["onnxruntime"] == onnxruntime.__version__  # this environment's versions
    assert Bundle.load(container_export / "model").model_sha256 == Bundle.load(mlp_bundle_dir).model_sha256
    assert os.access(container_export / "entrypoint.sh", os.X_OK)
    assert len(list((container_export / "wheels").glob("slipstream-*.whl"))) == 1


def test_gpu_built_bundle_and_foreign_int8_are_refused(mlp_bundle: Bundle, tmp_path: Path) -> None:
    manifest = mlp_bundle.manifest.model_copy(
        update={
            "metrics": {"build": {"target": "tensorrt", "batch_size": 1}},
            "resolved": {"quantize.static": {"reduce_range": False}},
        }
    )
    bundle = write_bundle(tmp_path / "b", mlp_bundle.load_model(), manifest).path
    other = "aarch64" if os.uname().machine == "x86_64" else "x86_64"
    with pytest.raises(ExportRefusedError) as caught:
        export(bundle, "container", tmp_path / "out", DeployOptions(architecture=other))  # type: ignore[arg-type]
    reasons = caught.value.reasons
    assert any("built for tensorrt" in r for r in reasons)
    assert any("full-range int8" in r for r in reasons)
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dockerfile_install(context: Path, venv: Path) -> str:
    """The Dockerfile's `RUN pip install ...` instruction, pointed at the export's files and the venv's pip."""
    text = (context / "Dockerfile").read_text().replace("\\\n", " ")
    (run,) = [line for line in text.splitlines() if line.startswith("RUN pip install")]
    command = run.removeprefix("RUN ")
    command = command.replace("/tmp/requirements.lock", str(context / "requirements.lock"))
    for wheel in (context / "wheels").iterdir():
        command = command.replace(f"/tmp/{wheel.name}", str(wheel))
    command = re.sub(r"&& rm -f [^&]*$", "", command)  # the image's cleanup would delete the export's files
    return command.replace("pip ", f"{venv / 'bin' / 'pip'} ")


@pytest.fixture(scope="session")
def image_venv(container_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("image-venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        _dockerfile_install(container_export, venv), shell=True, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return venv


@pytest.fixture
def served(container_export: Path, image_venv: Path, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{image_venv / 'bin'}:{os.environ['PATH']}",
        "SLIPSTREAM_MODEL_DIR": str(container_export / "model"),
        "PORT": str(port),
        "SLIPSTREAM_API_KEYS": "deploy-test-key-0123456789",
    }
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    log = tmp_path / "server.log"  # a file, not a pipe: an unread pipe would fill and stall the server
    with log.open("wb") as sink:
        proc = subprocess.Popen(["/bin/sh", str(container_export / "entrypoint.sh")], env=env, stdout=sink, stderr=sink)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the entrypoint exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the served venv never became ready")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_the_images_contents_serve_without_torch_or_tensorflow(served: str, image_venv: Path) -> None:
    body = {"inputs": [{"name": "pixels", "shape": [2, 8], "datatype": "FP32", "data": [0.5] * 16}]}
    headers = {"authorization": "Bearer deploy-test-key-0123456789"}
    reply = httpx.post(f"{served}/v2/models/mlp/infer", json=body, headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert output["shape"] == [2, 4]
    python = str(image_venv / "bin" / "python")
    for module in ("torch", "tensorflow"):
        done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, check=False)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
    size = sum(p.stat().st_size for p in image_venv.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"\nimage venv installed size: {size / 2**20:.0f} MiB")


def _engine() -> str | None:
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if path and subprocess.run([path, "info"], capture_output=True, check=False).returncode == 0:
            return path
    return None


@pytest.mark.container
def test_the_image_builds_and_serves(container_export: Path) -> None:
    engine = _engine()
    if engine is None:
        pytest.fail("the container tests need a running docker or podman (deselect them with -m 'not container')")
    tag = f"slipstream-deploy-test:{os.getpid()}"
    subprocess.run([engine, "build", "-t", tag, str(container_export)], check=True)
    port = _free_port()
    name = f"slipstream-deploy-test-{os.getpid()}"
    subprocess.run(
        [
            engine,
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            "-p",
            f"127.0.0.1:{port}:8000",
            "-e",
            "SLIPSTREAM_API_KEYS=deploy-test-key-0123456789",
            tag,
        ],
        check=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"inputs": [{"name": "pixels", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
        headers = {"authorization": "Bearer deploy-test-key-0123456789"}
        reply = httpx.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=body, headers=headers, timeout=10)
        assert reply.status_code == 200, reply.text
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, check=False)
