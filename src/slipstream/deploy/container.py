"""A container: a Docker build context that serves the bundle with ``slipstream serve`` and nothing more.

    DIR/Dockerfile           slim Python, a non-root user, the lock installed exactly, a HEALTHCHECK
    DIR/requirements.lock    slipstream[serve,monitor]'s closure pinned at this environment's versions
    DIR/wheels/              the slipstream wheel itself
    DIR/model/               the bundle, or the repository, as verified here
    DIR/entrypoint.sh        verifies every bundle again, then execs `slipstream serve`
    DIR/sbom.cdx.json        the image's CycloneDX bill of materials: the lock's packages and slipstream
    DIR/trusted_key.pem      with --trusted-key: the key the bundles' model.sig must verify with; the entrypoint then
                             verifies the signatures and serves with --require-signature

Only the serving and monitoring extras go in: no torch and no TensorFlow, which the test of this target shows
by installing the same wheel and lock into a fresh venv and serving from it with the entrypoint's command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from slipstream.artifact.manifest import current_version
from slipstream.artifact.sbom import SBOM_FILE, lock_sbom
from slipstream.deploy.base import DeployOptions, DeploySource, host_architecture
from slipstream.deploy.files import copy_bundle
from slipstream.deploy.lock import SERVE_EXTRAS, lock_text, runtime_lock
from slipstream.deploy.resources import build_target
from slipstream.deploy.signed import TRUSTED_KEY_FILE, copy_trusted_key, signature_refusals
from slipstream.errors import ConfigError
from slipstream.runtime.choice import engine_choice

MODEL_DIR = "/srv/model"
TRUSTED_KEY = f"/srv/{TRUSTED_KEY_FILE}"
ENTRYPOINT = "entrypoint.sh"
USER_ID = 10001
# What the entrypoint runs, with the model directory and port from the environment: the test runs these lines.
ENTRYPOINT_SCRIPT = """#!/bin/sh
# Written by `slipstream export --to container`. Verifies every bundle's files against its manifest, then
# serves. Off loopback the server needs API keys: pass SLIPSTREAM_API_KEYS (one key per line) to the container.
set -eu
MODEL_DIR="${SLIPSTREAM_MODEL_DIR:-/srv/model}"
PORT="${PORT:-8000}"
HOST="${HOST:-0.0.0.0}"
python -m slipstream.deploy.verify "$MODEL_DIR"
exec slipstream serve "$MODEL_DIR" --host "$HOST" --port "$PORT" "$@"
"""
# A signed export (--trusted-key): the signatures are verified too, and the server requires them.
SIGNED_ENTRYPOINT_SCRIPT = """#!/bin/sh
# Written by `slipstream export --to container --trusted-key ...`. Verifies every bundle's signature (model.sig,
# against the trusted key) and files, then serves with --require-signature, so a version is refused at start and
# at reload unless it is signed by that key. Off loopback the server needs API keys: pass SLIPSTREAM_API_KEYS.
set -eu
MODEL_DIR="${SLIPSTREAM_MODEL_DIR:-/srv/model}"
PORT="${PORT:-8000}"
HOST="${HOST:-0.0.0.0}"
TRUSTED_KEY="${SLIPSTREAM_TRUSTED_KEY:-/srv/trusted_key.pem}"
python -m slipstream.deploy.verify "$MODEL_DIR" --trusted-key "$TRUSTED_KEY"
exec slipstream serve "$MODEL_DIR" --require-signature --trusted-key "$TRUSTED_KEY" \\
  --host "$HOST" --port "$PORT" "$@"
"""
_PLATFORMS = {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}


def source_tree() -> Path | None:
    """The checkout slipstream is installed from (an editable install), where a wheel can be built."""
    import slipstream

    root = Path(slipstream.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "slipstream"' in pyproject.read_text(encoding="utf-8"):
        return root
    return None


class ContainerDeployer:
    name: ClassVar[str] = "container"

    def refusals(self, source: DeploySource, options: DeployOptions) -> list[str]:
        from slipstream.runtime.engine import full_range_int8

        reasons = signature_refusals(source, options)
        if options.wheel is not None and not (options.wheel.is_file() and options.wheel.suffix == ".whl"):
            reasons.append(f"--wheel '{options.wheel}' is not a wheel file")
        elif options.wheel is None and source_tree() is None:
            reasons.append("slipstream is not installed from a source tree here: pass --wheel with slipstream's wheel")
        arch = options.target_architecture
        for item in source.bundles:
            target = build_target(item.bundle)
            where = f"model '{item.name}' version {item.version}"
            if target in ("cuda", "tensorrt"):
                reasons.append(
                    f"{where} was built for {target}, and this image runs onnxruntime on the CPU: rebuild it for cpu, "
                    "or export it --to triton"
                )
            if target == "openvino" and arch != "x86_64":
                reasons.append(f"{where} was built for OpenVINO, whose onnxruntime provider ships for x86_64 only")
            if arch != host_architecture() and full_range_int8(item.bundle.manifest.resolved):
                reasons.append(
                    f"{where} has full-range int8 weights whose kernels were chosen on this {host_architecture()} CPU "
                    f"(VNNI/AMX); on {arch} they may saturate: rebuild it on {arch}, or with reduce_range"
                )
        return reasons

    def write(self, source: DeploySource, options: DeployOptions, into: Path) -> list[Path]:
        written: list[Path] = []
        for item in source.bundles:
            dest = into / "model" / item.name / item.version if source.repository else into / "model"
            written += copy_bundle(item.bundle, dest)
        wheel = _wheel(options, into / "wheels")
        written.append(wheel)
        lock = into / "requirements.lock"
        extras = (*SERVE_EXTRAS, "signing") if options.trusted_key is not None else SERVE_EXTRAS
        if any(engine_choice(item.bundle.manifest).engine == "openvino" for item in source.bundles):
            extras = (*extras, "openvino")  # the build chose OpenVINO for a model: the image runs it there
        header = (
            f"slipstream[{','.join(extras)}] runtime closure, pinned at the versions installed where it was "
            f"exported\n(Python {sys.version.split()[0]}, {host_architecture()}). Installed with --no-deps: "
            "exactly these."
        )
        pins = runtime_lock(extras)
        lock.write_text(lock_text(pins, header), encoding="utf-8")
        sbom = into / SBOM_FILE
        sbom.write_bytes(lock_sbom({**pins, "slipstream": current_version()}, options.image))
        entrypoint = into / ENTRYPOINT
        signed = options.trusted_key is not None
        entrypoint.write_text(SIGNED_ENTRYPOINT_SCRIPT if signed else ENTRYPOINT_SCRIPT, encoding="utf-8")
        entrypoint.chmod(0o755)
        key = copy_trusted_key(options, into)
        dockerfile = into / "Dockerfile"
        dockerfile.write_text(dockerfile_text(options, wheel.name), encoding="utf-8")
        return [*written, lock, sbom, entrypoint, *key, dockerfile]


def _wheel(options: DeployOptions, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if options.wheel is not None:
        target = dest / options.wheel.name
        shutil.copyfile(options.wheel, target)
        return target
    tree = source_tree()
    if tree is None:  # refusals() said so before anything was written; kept for a direct call
        raise ConfigError("No slipstream wheel to install.", field="wheel", hint="Pass --wheel.")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = sorted(dest.glob("slipstream-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ConfigError(
            f"Building slipstream's wheel from '{tree}' failed (pip exit {done.returncode}): "
            + (done.stderr.strip().splitlines() or ["no output"])[-1],
            field="wheel",
            hint="Build it yourself (`pip wheel --no-deps .`) and pass --wheel.",
        )
    return wheels[0]


def dockerfile_text(options: DeployOptions, wheel_name: str) -> str:
    platform = _PLATFORMS.get(options.target_architecture, options.target_architecture)
    probe = (
        "import os, urllib.request; "
        "urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/v2/health/ready\", timeout=2)"
    )
    key_copy = f"COPY {TRUSTED_KEY_FILE} {TRUSTED_KEY}\n" if options.trusted_key is not None else ""
    return f"""# Written by `slipstream export --to container`.
#   docker build --platform {platform} -t {options.image} .
#   docker run -p {options.port}:{options.port} -e SLIPSTREAM_API_KEYS="$(cat keys.txt)" {options.image}
FROM {options.base_image}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The lock is the whole closure of slipstream[serve,monitor]: installed without resolving, then checked.
COPY requirements.lock /tmp/requirements.lock
COPY wheels/{wheel_name} /tmp/{wheel_name}
RUN pip install --no-deps -r /tmp/requirements.lock \\
 && pip install --no-deps /tmp/{wheel_name} \\
 && pip check \\
 && rm -f /tmp/requirements.lock /tmp/{wheel_name}

RUN useradd --system --uid {USER_ID} --no-create-home --shell /usr/sbin/nologin slipstream
COPY model/ {MODEL_DIR}/
{key_copy}COPY {ENTRYPOINT} /usr/local/bin/slipstream-entrypoint
RUN chmod 0755 /usr/local/bin/slipstream-entrypoint && chmod -R a+rX,go-w {MODEL_DIR}

USER {USER_ID}
ENV SLIPSTREAM_MODEL_DIR={MODEL_DIR} PORT={options.port} HOST=0.0.0.0
EXPOSE {options.port}
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \\
  CMD ["python", "-c", "{probe.replace('"', chr(92) + '"')}"]
ENTRYPOINT ["/usr/local/bin/slipstream-entrypoint"]
"""
