"""CycloneDX bills of materials: the environment that built a bundle, and the lock of a serving image.

``build`` writes ``sbom.cdx.json`` into the winner bundle (so the signature covers it): the bundle as a
machine-learning-model component, the source model it was made from with its sha256, the Python interpreter, and
every Python distribution installed where it was built (onnxruntime among them) at its installed version.
``export --to container`` writes the same kind of document for the image: the packages of its lock.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipstream.errors import MissingDependencyError

if TYPE_CHECKING:
    from slipstream.artifact.manifest import Manifest

SBOM_FILE = "sbom.cdx.json"
SPEC_VERSION = "1.6"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_packages() -> dict[str, str]:
    """Canonical name -> version of every Python distribution importable here (the first one found wins)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return dict(sorted(found.items()))


def _cyclonedx() -> Any:
    try:
        import cyclonedx.model.bom
        import cyclonedx.model.component
        import cyclonedx.output.json
        import packageurl
    except ImportError as exc:
        raise MissingDependencyError(
            "cyclonedx-python-lib", extra="signing", feature="Writing a CycloneDX bill of materials"
        ) from exc
    return cyclonedx, packageurl


def _document(root: Any, parts: list[Any], packages: Mapping[str, str]) -> bytes:
    cyclonedx, packageurl = _cyclonedx()
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType

    from slipstream.artifact.manifest import current_version

    bom = Bom()
    bom.metadata.component = root
    bom.metadata.tools.components.add(
        Component(type=ComponentType.APPLICATION, name="slipstream", version=current_version())
    )
    libraries = [
        Component(
            type=ComponentType.LIBRARY,
            name=name,
            version=version,
            purl=packageurl.PackageURL(type="pypi", name=name, version=version),
            bom_ref=f"pkg:pypi/{name}@{version}",
        )
        for name, version in packages.items()
    ]
    for component in [*parts, *libraries]:
        bom.components.add(component)
    bom.register_dependency(root, [*parts, *libraries])
    text: str = cyclonedx.output.json.JsonV1Dot6(bom).output_as_string(indent=2)
    return text.encode("utf-8") + b"\n"


def _python() -> Any:
    from cyclonedx.model.component import Component, ComponentType

    return Component(
        type=ComponentType.PLATFORM,
        name=platform.python_implementation().lower(),
        version=platform.python_version(),
        bom_ref="python",
    )


def environment_sbom(manifest: Manifest, packages: Mapping[str, str] | None = None) -> bytes:
    """The CycloneDX JSON of the bundle ``manifest`` describes, as built here: source model, Python, packages."""
    _cyclonedx()
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.component import Component, ComponentType

    root = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=manifest.name, version=manifest.version, bom_ref="bundle"
    )
    src = manifest.source
    source = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=Path(src.path).name if src.path else f"{manifest.name} source",
        bom_ref="source-model",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=src.sha256)] if src.sha256 else [],
        properties=[Property(name="slipstream:framework", value=src.framework)],
    )
    return _document(root, [source, _python()], installed_packages() if packages is None else packages)


def lock_sbom(pins: Mapping[str, str], image: str) -> bytes:
    """The CycloneDX JSON of a serving image: its lock's pinned packages, under the image's name."""
    _cyclonedx()
    from cyclonedx.model.component import Component, ComponentType

    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    root = Component(type=ComponentType.CONTAINER, name=name, version=tag or None, bom_ref="image")
    return _document(root, [_python()], pins)
