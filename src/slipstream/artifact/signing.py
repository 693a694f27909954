"""OpenSSF model signing of bundles: ``model.sig`` beside the files it covers, checked before a bundle serves.

The signature is model-signing's own format (a Sigstore bundle holding a DSSE envelope whose in-toto statement
lists every file with its sha256), made offline with an ECDSA key pair or with a signing certificate, so that the
``model_signing`` library's verifier accepts a slipstream signature and the other way round. It covers every file
of the bundle, ``manifest.json`` and ``profile.json`` included; only ``model.sig`` itself is left out (model-signing's
ignore paths, which the signed statement records).

When a signature does not verify, model-signing says "Signature mismatch" or "Key mismatch";
:func:`verify_bundle` then compares the files on disk with the digests the signature lists and names the file that
differs, and otherwise the key (or certificate chain) that did not make the signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slipstream.artifact.bundle import SIGNATURE_FILE, Bundle
from slipstream.artifact.members import MemberError, open_bundle_dir, read_member
from slipstream.errors import BundleExistsError, ConfigError, MissingDependencyError, SignatureError

if TYPE_CHECKING:
    from slipstream.artifact.manifest import Manifest

__all__ = [
    "SIGNATURE_FILE",
    "Reason",
    "SignedFiles",
    "TrustAnchor",
    "check_signed_manifest",
    "generate_key_pair",
    "read_signed_files",
    "sign_bundle",
    "verify_bundle",
]

Reason = Literal["unsigned", "modified", "untrusted", "unreadable"]
_CHUNK = 1 << 20


def _model_signing() -> Any:
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise MissingDependencyError("model-signing", extra="signing", feature="Signing bundles") from exc
    return model_signing


@dataclass(frozen=True)
class SignedFiles:
    """What a signature's statement lists (read from the file; trusted only once :func:`verify_bundle` passed)."""

    hash_type: str
    digests: dict[str, str]  # file name (relative, POSIX) -> hex digest
    ignored: tuple[str, ...]


def read_signed_files(data: bytes) -> SignedFiles:
    """The files and digests a model-signing signature lists; ValueError when it is not one."""
    try:
        doc = json.loads(data)
        statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"], validate=True))
        predicate = statement["predicate"]
        serialization = predicate["serialization"]
        digests = {str(r["name"]): str(r["digest"]) for r in predicate["resources"]}
        return SignedFiles(
            hash_type=str(serialization["hash_type"]),
            digests=digests,
            ignored=tuple(str(p) for p in serialization.get("ignore_paths", ())),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not a model-signing signature ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class TrustAnchor:
    """What a signature must verify against: a PEM public key (ECDSA P-256/384/521), or a certificate chain
    (model-signing's certificate mode: the signing certificate in the signature must chain to it)."""

    public_key: Path | None = None
    certificate_chain: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if (self.public_key is None) == (not self.certificate_chain):
            raise ConfigError(
                "Verifying a signature needs exactly one trust anchor: a public key, or a certificate chain.",
                field="trusted_key",
                hint="Pass --key PUBLIC.pem (or --trusted-key), or --certificate CA.pem (repeatable), not both.",
            )
        for path in (self.public_key, *self.certificate_chain):
            if path is not None and not path.is_file():
                raise ConfigError(
                    f"The trust anchor '{path}' is not a readable file.",
                    field="trusted_key",
                    hint="Give the PEM file written by `slipstream keygen` (public.pem) or your CA's certificate.",
                )
        if self.public_key is not None:
            self._check_public_key(self.public_key)

    @staticmethod
    def _check_public_key(path: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except ValueError as exc:
            raise ConfigError(
                f"'{path}' is not a PEM public key ({exc}).",
                field="trusted_key",
                hint="Pass the public half of the signing key pair (public.pem from `slipstream keygen`).",
            ) from exc
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(
                f"'{path}' holds a {type(key).__name__}; model signing uses elliptic-curve (ECDSA) keys.",
                field="trusted_key",
                hint="Make a P-256 key pair with `slipstream keygen`.",
            )

    def describe(self) -> str:
        if self.public_key is not None:
            return f"the key '{self.public_key}'"
        return "the certificate chain " + ", ".join(f"'{p}'" for p in self.certificate_chain)

    def verifier(self) -> Any:
        """A fresh model_signing verifying.Config (it caches the hashing config it guesses: one per bundle)."""
        ms = _model_signing()
        config = ms.verifying.Config()
        if self.public_key is not None:
            return config.use_elliptic_key_verifier(public_key=self.public_key)
        return config.use_certificate_verifier(certificate_chain=list(self.certificate_chain))


def generate_key_pair(private_key: Path, public_key: Path) -> None:
    """Write a new ECDSA P-256 key pair as PEM: the private key readable by its owner only. Refuses to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for path in (private_key, public_key):
        if path.exists():
            raise BundleExistsError(
                f"Refusing to write a key to '{path}': it already exists.",
                path=path,
                hint="Choose other paths; an existing key may be the one your servers trust.",
            )
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_key.parent.mkdir(parents=True, exist_ok=True)
    public_key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_key.write_bytes(public_pem)


def sign_bundle(
    path: str | os.PathLike[str],
    private_key: Path,
    *,
    certificate: Path | None = None,
    certificate_chain: Sequence[Path] = (),
) -> Path:
    """Sign every file of the bundle at ``path`` into ``path/model.sig`` (replacing an older signature).

    The bundle is verified first (a damaged bundle is not signed). With ``certificate``, model-signing's
    certificate mode: the signature carries that certificate (and ``certificate_chain``) for verifiers that trust
    a CA instead of one key. The signature is written beside the bundle and renamed into it, so a reader sees the
    old signature or the new one.
    """
    root = Path(path)
    if certificate is not None and not certificate_chain:
        raise ConfigError(
            "Signing with a certificate needs its chain: model-signing carries the certificates up to the CA.",
            field="certificate_chain",
            hint="Pass --certificate-chain CA.pem (and any intermediate certificates), or sign with --key alone.",
        )
    Bundle.load(root)
    ms = _model_signing()
    hashing = ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)
    config = ms.signing.Config().set_hashing_config(hashing)
    try:
        if certificate is not None:
            config.use_certificate_signer(
                private_key=private_key, signing_certificate=certificate, certificate_chain=list(certificate_chain)
            )
        else:
            config.use_elliptic_key_signer(private_key=private_key)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(
            f"Cannot sign with '{private_key}'" + (f" and '{certificate}'" if certificate else "") + f": {exc}.",
            field="key",
            hint="Pass an unencrypted PEM elliptic-curve private key (private.pem from `slipstream keygen`).",
        ) from exc
    fd, name = tempfile.mkstemp(prefix=f".{root.name}.", suffix=".sig.tmp", dir=root.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        config.sign(root, tmp)
        tmp.chmod(0o644)
        tmp.replace(root / SIGNATURE_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return root / SIGNATURE_FILE


def _read_signature(root: Path) -> bytes:
    try:
        with open_bundle_dir(root) as dir_fd:
            return read_member(dir_fd, SIGNATURE_FILE)
    except (FileNotFoundError, NotADirectoryError):
        raise SignatureError(
            f"No bundle directory at '{root}'.", path=root, reason="unreadable", file=SIGNATURE_FILE
        ) from None
    except MemberError as problem:
        if problem.containment:
            raise SignatureError(
                f"Bundle '{root}' cannot be checked: {problem.text}.",
                path=root,
                reason="unreadable",
                file=SIGNATURE_FILE,
                hint="A signature is a regular file in the bundle; restore the bundle from a trusted copy.",
            ) from None
        raise SignatureError(
            f"Bundle '{root}' is not signed: it has no {SIGNATURE_FILE}, and a signature is required.",
            path=root,
            reason="unsigned",
            file=SIGNATURE_FILE,
            hint="Sign it with `slipstream sign BUNDLE --key private.pem`, or serve without --require-signature.",
        ) from None


def _files(root: Path) -> list[str]:
    """Every file under ``root`` as model-signing names it (relative, POSIX), the signature left out."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            rel = Path(folder, name).relative_to(root).as_posix()
            if rel != SIGNATURE_FILE:
                found.append(rel)
    return sorted(found)


def _digest(path: Path, hash_type: str) -> str | None:
    algorithm = {"sha256": "sha256", "blake2": "blake2b"}.get(hash_type)
    if algorithm is None:
        return None  # blake3 and others: model-signing's own message has to do
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_problems(root: Path, signed: SignedFiles, *, digests: bool = True) -> list[tuple[str, str]]:
    """(file, what is wrong) for every file that differs from what the signature lists: not covered, missing, or
    with another digest (compared only with ``digests``)."""
    present = _files(root)
    problems: list[tuple[str, str]] = []
    for name in sorted(set(present) | set(signed.digests)):
        if name not in signed.digests:
            problems.append((name, f"'{name}' is not covered by the signature"))
        elif name not in present:
            problems.append((name, f"'{name}' is signed but missing"))
        elif digests:
            actual = _digest(root / name, signed.hash_type)
            if actual is not None and actual != signed.digests[name]:
                problems.append((name, f"'{name}' differs from its signed {signed.hash_type} digest"))
    return problems


def verify_bundle(path: str | os.PathLike[str], anchor: TrustAnchor) -> SignedFiles:
    """Check ``path/model.sig`` with model-signing's verifier against ``anchor``, and that it covers every file.

    Returns what the signature lists. Raises SignatureError naming the file that differs, or the key.
    """
    root = Path(path)
    data = _read_signature(root)
    try:
        signed = read_signed_files(data)
    except ValueError as exc:
        raise SignatureError(
            f"{SIGNATURE_FILE} in '{root}' cannot be read: {exc}.",
            path=root,
            reason="unreadable",
            file=SIGNATURE_FILE,
            hint="Sign the bundle again with `slipstream sign`.",
        ) from exc
    try:
        anchor.verifier().verify(root, root / SIGNATURE_FILE)
    except Exception as exc:  # model-signing raises ValueError, cryptography's InvalidSignature, protobuf errors...
        failure = f"{type(exc).__name__}: {exc}"
        _raise_modified(root, file_problems(root, signed))  # names the files (model-signing's text shows bytes)
        if str(exc).startswith("Signature mismatch"):  # a digest this module cannot recompute (blake3)
            raise SignatureError(
                f"Bundle '{root}' does not match its signature ({failure}).",
                path=root,
                reason="modified",
                file=SIGNATURE_FILE,
                hint="Restore the bundle from a trusted copy, or rebuild and sign it again.",
            ) from exc
        raise SignatureError(
            f"The signature of '{root}' ({SIGNATURE_FILE}) was not made by {anchor.describe()}, though every file "
            f"matches the digests it lists ({failure}).",
            path=root,
            reason="untrusted",
            file=SIGNATURE_FILE,
            hint="Verify with the public key of whoever signed this bundle, or have it signed with a trusted key.",
        ) from exc
    # model-signing hashed every file it was not told to ignore; a file the signer ignored is unsigned here.
    _raise_modified(root, file_problems(root, signed, digests=False))
    return signed


def _raise_modified(root: Path, problems: list[tuple[str, str]]) -> None:
    if not problems:
        return
    detail = "; ".join(text for _, text in problems)
    raise SignatureError(
        f"Bundle '{root}' does not match its signature: {detail}.",
        path=root,
        reason="modified",
        file=problems[0][0],
        hint="The bundle changed after it was signed: restore it from a trusted copy, or rebuild and sign it again.",
    )


def check_signed_manifest(root: Path, signed: SignedFiles, manifest: Manifest) -> None:
    """Every file the loaded manifest lists has the digest the verified signature lists.

    Loading reads each file once and checks it against the manifest: with this, what is loaded is what was signed,
    even if files were swapped between the signature check and the load.
    """
    if signed.hash_type != "sha256":
        return
    for name, digest in sorted(manifest.files.items()):
        if signed.digests.get(name) != digest.sha256:
            raise SignatureError(
                f"Bundle '{root}' changed while it was loaded: the manifest's sha256 of '{name}' is not the "
                "signed one.",
                path=root,
                reason="modified",
                file=name,
                hint="Publish versions atomically (write elsewhere, then rename into the repository).",
            )
