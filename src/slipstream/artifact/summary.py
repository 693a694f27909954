"""What `slipstream inspect` shows: io, ops, parameters, the largest weights, lineage, metrics, and where the
signature and the bills of materials are."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, JsonValue

from slipstream.artifact.manifest import LineageEntry, ParityRecord, Source
from slipstream.artifact.tensor import ONNX_ELEM_TO_DTYPE, TensorSpec

if TYPE_CHECKING:
    import onnx

    from slipstream.artifact.bundle import Bundle


class InitializerInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int


class BundleSummary(BaseModel):
    """What `slipstream inspect` shows about a bundle."""

    model_config = ConfigDict(frozen=True)

    path: str
    name: str
    version: str
    source: Source
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opsets: dict[str, int]
    op_histogram: dict[str, int]
    node_count: int
    parameter_count: int
    weights_bytes: int
    bundle_bytes: int
    largest_initializers: tuple[InitializerInfo, ...]
    lineage: tuple[LineageEntry, ...]
    resolved: dict[str, JsonValue]
    metrics: dict[str, JsonValue]
    parity: ParityRecord | None
    signature: str | None = None  # model.sig, when the bundle is signed (`slipstream verify` checks it)
    sbom: str | None = None  # the build environment's CycloneDX SBOM, when the build wrote one
    image_sbom: str | None = None  # the serving image's SBOM, when the bundle sits in a `export --to container`


def _image_sbom(bundle_dir: Path) -> Path | None:
    """The SBOM of the container export holding this bundle (DIR/model/ or DIR/model/<name>/<version>/), if any."""
    from slipstream.artifact.sbom import SBOM_FILE

    for parent in list(bundle_dir.resolve().parents)[:3]:
        if (parent / "requirements.lock").is_file() and (parent / SBOM_FILE).is_file():
            return parent / SBOM_FILE
    return None


def _walk_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """All nodes, including those in If/Loop/Scan subgraphs."""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.HasField("g"):
                nodes.extend(_walk_nodes(attr.g))
            for sub in attr.graphs:
                nodes.extend(_walk_nodes(sub))
    return nodes


def _initializer_info(t: onnx.TensorProto) -> InitializerInfo:
    import onnx

    count = 1
    for d in t.dims:
        count *= int(d)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type != 8 else 0
    size = len(t.raw_data) if t.raw_data else count * itemsize
    return InitializerInfo(
        name=t.name,
        dtype=ONNX_ELEM_TO_DTYPE.get(t.data_type, str(t.data_type)),
        shape=tuple(int(d) for d in t.dims),
        size_bytes=size,
    )


def summarize(bundle: Bundle, *, top: int = 10) -> BundleSummary:
    """Describe a bundle: io specs, op histogram, parameters, the ``top`` largest weights, lineage."""
    from slipstream.artifact.bundle import SIGNATURE_FILE
    from slipstream.artifact.sbom import SBOM_FILE

    model = bundle.load_model()
    nodes = _walk_nodes(model.graph)
    histogram = Counter(n.op_type if not n.domain else f"{n.domain}::{n.op_type}" for n in nodes)
    inits = [_initializer_info(t) for t in model.graph.initializer]
    parameter_count = 0
    for info in inits:
        n = 1
        for d in info.shape:
            n *= d
        parameter_count += n
    m = bundle.manifest
    return BundleSummary(
        path=str(bundle.path),
        name=m.name,
        version=m.version,
        source=m.source,
        inputs=m.inputs,
        outputs=m.outputs,
        opsets={imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import},
        op_histogram=dict(histogram.most_common()),
        node_count=len(nodes),
        parameter_count=parameter_count,
        weights_bytes=sum(i.size_bytes for i in inits),
        bundle_bytes=bundle.size_bytes,
        largest_initializers=tuple(sorted(inits, key=lambda i: i.size_bytes, reverse=True)[:top]),
        lineage=m.lineage,
        resolved=m.resolved,
        metrics=m.metrics,
        parity=m.parity,
        signature=str(bundle.path / SIGNATURE_FILE) if (bundle.path / SIGNATURE_FILE).is_file() else None,
        sbom=str(bundle.path / SBOM_FILE) if SBOM_FILE in m.files else None,
        image_sbom=str(image) if (image := _image_sbom(bundle.path)) is not None else None,
    )
