"""Issue 23 part 1: OpenSSF model signing of bundles, checked by `verify`, `serve --require-signature` and `export`.

The bundle is the winner of a real build (model.onnx, manifest.json, profile.json, sbom.cdx.json); signatures are
checked by model_signing's own verifier as well as ours, and every kind of file is tampered with in turn.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import model_signing
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from slipstream.artifact import Bundle, publish_bundle
from slipstream.artifact.bundle import SIGNATURE_FILE
from slipstream.artifact.signing import TrustAnchor, generate_key_pair, sign_bundle, verify_bundle
from slipstream.cli import app
from slipstream.deploy import DeployOptions, export
from slipstream.deploy.ray import CONFIG_FILE, RayAppArgs, anchored
from slipstream.deploy.verify import main as verify_main
from slipstream.errors import ConfigError, ExportRefusedError, SignatureError
from slipstream.serve.app import create_app
from slipstream.serve.guard import hash_key
from slipstream.serve.settings import GuardSettings, ServeSettings, SigningSettings
from tests.serve_support import ADMIN_KEY, ServerThread

SLIPSTREAM = Path(sys.executable).with_name("slipstream")
KINDS = ("model.onnx", "manifest.json", "profile.json", "sbom.cdx.json")  # every kind of file a build writes
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("keys")
    generate_key_pair(work / "private.pem", work / "public.pem")
    generate_key_pair(work / "other-private.pem", work / "other-public.pem")
    return {p.stem: p for p in work.iterdir()}


@pytest.fixture(scope="module")
def signed(built_bundle_dir: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("signed") / "mlp"
    shutil.copytree(built_bundle_dir, dest)
    sign_bundle(dest, keys["private"])
    return dest


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages; compare them unwrapped


def test_the_signature_covers_every_file_and_model_signing_accepts_it(signed: Path, keys: dict[str, Path]) -> None:
    assert sorted(p.name for p in signed.iterdir()) == sorted([*KINDS, SIGNATURE_FILE])
    # model_signing's own verifier, with nothing of ours in between.
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["public"]).verify(
        signed, signed / SIGNATURE_FILE
    )
    listed = verify_bundle(signed, TrustAnchor(public_key=keys["public"]))
    assert sorted(listed.digests) == sorted(KINDS) and listed.hash_type == "sha256"
    manifest = Bundle.load(signed).manifest  # the unlisted model.sig does not upset loading
    assert all(listed.digests[n] == d.sha256 for n, d in manifest.files.items())
    shown = runner.invoke(app, ["inspect", str(signed), "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"signature": "' + str(signed / SIGNATURE_FILE) in shown.output
    with pytest.raises(SignatureError) as caught:
        verify_bundle(signed, TrustAnchor(public_key=keys["other-public"]))
    assert caught.value.reason == "untrusted" and "other-public.pem" in caught.value.message


def test_a_signature_made_by_model_signing_passes_our_verify(
    built_bundle_dir: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    bundle = _copy(built_bundle_dir, tmp_path / "b")
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys["private"]).set_hashing_config(
        hashing
    ).sign(bundle, bundle / SIGNATURE_FILE)
    done = runner.invoke(app, ["verify", str(bundle), "--key", str(keys["public"])])
    assert done.exit_code == 0, done.output
    assert "verified over 4 files" in _flat(done.output)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_refuses_a_flipped_byte_naming_the_file(
    signed: Path, keys: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    bundle = _copy(signed, tmp_path / "b")
    _flip(bundle / kind)
    done = runner.invoke(app, ["verify", str(bundle), "--key", str(keys["public"])])
    text = _flat(done.output)
    assert done.exit_code == 1
    assert f"'{kind}' differs from its signed sha256 digest" in text
    assert sum(f"'{other}' differs" in text for other in KINDS) == 1  # only the flipped file is named
    with pytest.raises(SignatureError) as caught:
        verify_bundle(bundle, TrustAnchor(public_key=keys["public"]))
    assert (caught.value.reason, caught.value.file) == ("modified", kind)


def test_verify_names_the_key_an_unsigned_bundle_and_an_unsigned_extra_file(
    built_bundle_dir: Path, signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    wrong = runner.invoke(app, ["verify", str(signed), "--key", str(keys["other-public"])])
    assert wrong.exit_code == 1 and f"was not made by the key '{keys['other-public']}'" in _flat(wrong.output)
    unsigned = runner.invoke(app, ["verify", str(built_bundle_dir), "--key", str(keys["public"])])
    assert unsigned.exit_code == 1 and "is not signed: it has no model.sig" in _flat(unsigned.output)
    extra = _copy(signed, tmp_path / "extra")
    (extra / "notes.txt").write_text("added after signing\n")
    with pytest.raises(SignatureError) as caught:
        verify_bundle(extra, TrustAnchor(public_key=keys["public"]))
    assert caught.value.file == "notes.txt" and "'notes.txt' is not covered by the signature" in caught.value.message
    with pytest.raises(ConfigError, match="not a PEM public key"):
        TrustAnchor(public_key=keys["private"])


def _lifespan_startup(path: Path, settings: ServeSettings) -> dict[str, Any]:
    """What the server's app answers uvicorn's ASGI lifespan startup, as it does when `slipstream serve` starts."""
    app = create_app(path, settings)
    sent: list[dict[str, Any]] = []
    incoming = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    return sent[0]


def test_serve_refuses_each_flipped_file_at_start(signed: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    """The server's startup per kind of file, and the real `slipstream serve` process for one of them: each
    refuses to start, naming the flipped file."""
    bundles = {}
    for i, kind in enumerate(KINDS):
        bundles[kind] = _copy(signed, tmp_path / f"b{i}")
        _flip(bundles[kind] / kind)
    cmd = [str(SLIPSTREAM), "serve", str(bundles["model.onnx"]), "--port", "0", "--require-signature",
           "--trusted-key", str(keys["public"]), "--no-access-log"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        settings = ServeSettings(
            access_log=False, signing=SigningSettings(require_signature=True, trusted_key=keys["public"])
        )
        for kind, bundle in bundles.items():
            refused = _lifespan_startup(bundle, settings)
            assert refused["type"] == "lifespan.startup.failed"
            assert f"No model could be served from '{bundle}'" in refused["message"]
            assert f"'{kind}' differs from its signed sha256 digest" in refused["message"]
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode != 0  # uvicorn exits 3 when the app's startup fails
    assert "'model.onnx' differs from its signed sha256 digest" in out and "No model could be served" in out


def test_serve_settings_need_a_trusted_key_with_the_requirement(keys: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="require_signature needs trusted_key"):
        SigningSettings(require_signature=True)
    with pytest.raises(ValueError, match="take effect only with require_signature"):
        SigningSettings(trusted_key=keys["public"])
    done = runner.invoke(app, ["serve", "nowhere", "--require-signature"])
    assert done.exit_code == 1 and "require_signature needs trusted_key" in _flat(done.output)


def _infer(url: str) -> dict[str, Any]:
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 8], "data": x.reshape(-1).tolist()}]}
    response = httpx.post(f"{url}/v2/models/mlp/infer", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _index(url: str) -> dict[str, tuple[str, str]]:
    rows = httpx.post(f"{url}/v2/repository/index", headers=ADMIN).json()
    return {r["version"]: (r["state"], r["reason"]) for r in rows if r["name"] == "mlp"}


def _refusals(url: str, reason: str) -> int:
    prefix = f'slipstream_signature_refusals_total{{model="mlp",reason="{reason}"}} '
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)]
    return int(float(lines[0].removeprefix(prefix))) if lines else 0


def _load(url: str) -> None:
    assert httpx.post(f"{url}/v2/repository/models/mlp/load", headers=ADMIN).status_code == 200


def test_hot_reload_refuses_unsigned_and_modified_versions_while_the_signed_one_serves(
    signed: Path, built_bundle_dir: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish_bundle(signed, repo / "mlp" / "1")  # the signature travels with a published version
    settings = ServeSettings(
        access_log=False,
        guard=GuardSettings(admin_key_hashes=frozenset({hash_key(ADMIN_KEY)})),
        signing=SigningSettings(require_signature=True, trusted_key=keys["public"]),
    )
    with ServerThread(repo, settings) as server:
        url = server.url
        assert _infer(url)["model_version"] == "1"

        publish_bundle(built_bundle_dir, repo / "mlp" / "2")  # unsigned
        _load(url)
        state, reason = _index(url)["2"]
        assert state == "UNAVAILABLE" and "is not signed: it has no model.sig" in reason
        assert _index(url)["1"] == ("READY", "")
        assert _infer(url)["model_version"] == "1"  # the signed version keeps serving
        assert _refusals(url, "unsigned") >= 1

        tampered = _copy(signed, tmp_path / "tampered")
        _flip(tampered / "profile.json")
        tampered.rename(repo / "mlp" / "3")
        _load(url)
        state, reason = _index(url)["3"]
        assert state == "UNAVAILABLE" and "'profile.json' differs from its signed sha256 digest" in reason
        assert _infer(url)["model_version"] == "1"
        assert _refusals(url, "modified") >= 1
        refused = httpx.post(f"{url}/v2/models/mlp/versions/3/infer", json={"inputs": []})
        assert refused.status_code == 503 and "its signature was refused" in refused.json()["error"]

        shutil.rmtree(repo / "mlp" / "3")
        sign_bundle(repo / "mlp" / "2", keys["private"])  # signed now: the retry serves it
        _load(url)
        _wait_for(lambda: _infer(url)["model_version"] == "2")


def _wait_for(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture
def fake_wheel(tmp_path: Path) -> Path:
    """The container export copies the wheel it is given; its content matters only to `docker build`."""
    wheel = tmp_path / "slipstream-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not installed by these tests")
    return wheel


def test_a_signed_container_export_carries_the_signature_and_requires_it(
    signed: Path, keys: dict[str, Path], fake_wheel: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ctx"
    result = export(signed, "container", out, DeployOptions(trusted_key=keys["public"], wheel=fake_wheel))
    assert {"model/model.sig", "trusted_key.pem", "sbom.cdx.json", "entrypoint.sh"} <= set(result.files)
    entrypoint = (out / "entrypoint.sh").read_text()
    assert 'verify "$MODEL_DIR" --trusted-key "$TRUSTED_KEY"' in entrypoint
    assert '--require-signature --trusted-key "$TRUSTED_KEY"' in entrypoint
    assert "COPY trusted_key.pem /srv/trusted_key.pem" in (out / "Dockerfile").read_text()
    assert "model-signing==" in (out / "requirements.lock").read_text()  # the image can verify
    # The entrypoint's own check, on the exported files: passes, then refuses a flipped byte naming the file.
    assert verify_main([str(out / "model"), "--trusted-key", str(out / "trusted_key.pem")]) == 0
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=out / "trusted_key.pem").verify(
        out / "model", out / "model" / SIGNATURE_FILE
    )
    _flip(out / "model" / "profile.json")
    with pytest.raises(SignatureError, match=r"'profile\.json' differs"):
        verify_bundle(out / "model", TrustAnchor(public_key=out / "trusted_key.pem"))

    plain = export(signed, "container", tmp_path / "plain", DeployOptions(wheel=fake_wheel))
    assert "model/model.sig" in plain.files and "trusted_key.pem" not in plain.files  # carried, not required
    assert "--require-signature" not in (tmp_path / "plain" / "entrypoint.sh").read_text()


def test_export_refuses_a_bundle_not_signed_by_the_trusted_key(
    signed: Path, built_bundle_dir: Path, keys: dict[str, Path], fake_wheel: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportRefusedError) as caught:
        export(signed, "ray", tmp_path / "a", DeployOptions(trusted_key=keys["other-public"]))
    assert "untrusted" in caught.value.reasons[0]
    with pytest.raises(ExportRefusedError) as caught:
        export(
            built_bundle_dir, "container", tmp_path / "b", DeployOptions(trusted_key=keys["public"], wheel=fake_wheel)
        )
    assert "unsigned" in caught.value.reasons[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_signed_ray_export_makes_every_replica_require_the_signature(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "app"
    result = export(signed, "ray", out, DeployOptions(trusted_key=keys["public"]))
    assert {"model/model.sig", "trusted_key.pem"} <= set(result.files)
    config = yaml.safe_load((out / CONFIG_FILE).read_text())
    args = RayAppArgs.model_validate(config["applications"][0]["args"])
    assert args.settings.signing.require_signature
    replica = anchored(args, out)  # what the replica's application() does on the node
    key = replica.settings.signing.trusted_key
    assert key == out / "trusted_key.pem"
    verify_bundle(out / args.root, TrustAnchor(public_key=key))


def _certificates(work: Path) -> tuple[Path, Path, Path]:
    """A CA and a code-signing leaf certificate with its key, as PEM files: (ca.pem, leaf.pem, leaf-key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    off = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only")
    usage = dict.fromkeys((*off, "decipher_only"), False)

    def cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey) -> bytes:
        ca = name == issuer
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (work / "ca.pem").write_bytes(cert("test CA", ca_key, "test CA", ca_key))
    (work / "leaf.pem").write_bytes(cert("signer", leaf_key, "test CA", ca_key))
    (work / "leaf-key.pem").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return work / "ca.pem", work / "leaf.pem", work / "leaf-key.pem"


def test_certificate_mode_signs_and_verifies_against_the_ca(built_bundle_dir: Path, tmp_path: Path) -> None:
    ca, leaf, leaf_key = _certificates(tmp_path)
    bundle = _copy(built_bundle_dir, tmp_path / "b")
    signing = ["sign", str(bundle), "--key", str(leaf_key), "--certificate", str(leaf)]
    assert runner.invoke(app, [*signing, "--certificate-chain", str(ca)]).exit_code == 0
    done = runner.invoke(app, ["verify", str(bundle), "--certificate", str(ca)])
    assert done.exit_code == 0, done.output
    model_signing.verifying.Config().use_certificate_verifier(certificate_chain=[ca]).verify(
        bundle, bundle / SIGNATURE_FILE
    )
    with pytest.raises(SignatureError) as caught:  # the leaf alone is no root of trust
        verify_bundle(bundle, TrustAnchor(certificate_chain=(leaf,)))
    assert caught.value.reason == "untrusted" and "leaf.pem" in caught.value.message
    assert "needs its chain" in _flat(runner.invoke(app, signing).output)
