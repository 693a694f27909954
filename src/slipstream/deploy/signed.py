"""Signed exports: the bundles' signatures travel along, with the public key the exported server checks them with.

``export --trusted-key public.pem`` refuses a source whose bundles are not signed by that key, copies the key into
the export as ``trusted_key.pem``, and makes the exported server start with ``--require-signature`` (the container's
entrypoint, every Ray replica): a bundle changed after the export is then refused at start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from slipstream.deploy.base import DeployOptions, DeploySource
from slipstream.errors import ConfigError, SignatureError

TRUSTED_KEY_FILE = "trusted_key.pem"


def signature_refusals(source: DeploySource, options: DeployOptions) -> list[str]:
    """Why the source cannot be exported as signed by ``options.trusted_key``; empty when it can (or unsigned)."""
    if options.trusted_key is None:
        return []
    from slipstream.artifact.signing import TrustAnchor, verify_bundle

    try:
        anchor = TrustAnchor(public_key=options.trusted_key)
    except ConfigError as exc:
        return [f"--trusted-key: {exc.message}"]
    reasons = []
    for item in source.bundles:
        try:
            verify_bundle(item.path, anchor)
        except SignatureError as exc:
            reasons.append(
                f"model '{item.name}' version {item.version} fails its signature check ({exc.reason}, "
                f"{exc.file}): {exc.message}; sign it with `slipstream sign` and the key of --trusted-key"
            )
    return reasons


def copy_trusted_key(options: DeployOptions, into: Path) -> list[Path]:
    """The trusted public key, copied to ``into/trusted_key.pem``; nothing for an unsigned export."""
    if options.trusted_key is None:
        return []
    target = into / TRUSTED_KEY_FILE
    shutil.copyfile(options.trusted_key, target)
    target.chmod(0o644)
    return [target]
