"""The bundle: model.onnx + manifest.json, written atomically and verified on load."""

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.manifest import SCHEMA_VERSION, FileDigest, LineageEntry, Manifest, Source
from slipstream.artifact.publish import publish_bundle
from slipstream.artifact.tensor import DType, TensorSpec

__all__ = [
    "SCHEMA_VERSION",
    "Bundle",
    "DType",
    "FileDigest",
    "LineageEntry",
    "Manifest",
    "Source",
    "Step",
    "TensorSpec",
    "publish_bundle",
    "write_bundle",
]
