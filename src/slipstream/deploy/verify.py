"""``python -m slipstream.deploy.verify DIR [--trusted-key KEY]``: verify every bundle of a bundle or repository,
or exit non-zero.

A container's entrypoint runs it before ``slipstream serve``: an image whose model files were changed or
damaged after the export stops at start with the integrity error, instead of starting and never turning ready.
With ``--trusted-key`` (a signed export), every bundle's model.sig must also verify with that key.
"""

from __future__ import annotations

import sys
from pathlib import Path

from slipstream.deploy.base import DeploySource
from slipstream.errors import SlipstreamError

USAGE = "usage: python -m slipstream.deploy.verify BUNDLE_OR_REPOSITORY [--trusted-key PUBLIC.pem]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    key: Path | None = None
    if len(args) == 3 and args[1] == "--trusted-key":
        key = Path(args[2])
    elif len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        source = DeploySource.load(Path(args[0]))
        if key is not None:
            from slipstream.artifact.signing import TrustAnchor, check_signed_manifest, verify_bundle

            anchor = TrustAnchor(public_key=key)
            for item in source.bundles:
                check_signed_manifest(item.path, verify_bundle(item.path, anchor), item.bundle.manifest)
    except SlipstreamError as exc:
        print(f"slipstream: refusing to serve: {exc}", file=sys.stderr)
        return 1
    signed = " and its signature" if key is not None else ""
    for item in source.bundles:
        print(
            f"verified {item.name}/{item.version}{signed} (model sha256 {item.bundle.model_sha256[:12]})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
