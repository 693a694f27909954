"""``python -m slipstream.deploy.verify DIR``: verify every bundle of a bundle or repository, or exit non-zero.

A container's entrypoint runs it before ``slipstream serve``: an image whose model files were changed or
damaged after the export stops at start with the integrity error, instead of starting and never turning ready.
"""

from __future__ import annotations

import sys
from pathlib import Path

from slipstream.deploy.base import DeploySource
from slipstream.errors import SlipstreamError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m slipstream.deploy.verify BUNDLE_OR_REPOSITORY", file=sys.stderr)
        return 2
    try:
        source = DeploySource.load(Path(args[0]))
    except SlipstreamError as exc:
        print(f"slipstream: refusing to serve: {exc}", file=sys.stderr)
        return 1
    for item in source.bundles:
        print(f"verified {item.name}/{item.version} (model sha256 {item.bundle.model_sha256[:12]})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
