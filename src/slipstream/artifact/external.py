"""External tensor data: where an ONNX model says its weights live, and filling them from verified bytes.

A model stored with external data names a file (``location``) for each large tensor. Left to itself,
onnx or onnxruntime would open that name relative to the model, which could be any path
(``/etc/passwd``, ``../other/weights``). A bundle allows exactly one location, its own listed side file;
the loaders then take the tensors from the bytes already read and hashed, never from the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx

from slipstream.errors import IntegrityError

DATA_FILE = "model.onnx.data"  # the one external data file a bundle may have (bundle.EXTERNAL_DATA_FILE)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model stores: initializers, sparse initializers, attribute tensors, in subgraphs too."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _uses_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_external_locations(root: Path, model: onnx.ModelProto, *, has_data_file: bool) -> None:
    """Refuse a model whose external tensors point anywhere but the bundle's listed ``model.onnx.data``."""
    for tensor in all_tensors(model):
        if not _uses_external(tensor):
            continue
        location = _fields(tensor).get("location", "")
        if location != DATA_FILE or not has_data_file:
            where = f"'{location}'" if location != DATA_FILE else f"{DATA_FILE}, which the manifest does not list"
            raise IntegrityError(
                f"Bundle '{root}': model.onnx keeps tensor '{tensor.name}' in {where}; a bundle's model may keep "
                f"external data only in its own listed {DATA_FILE}.",
                path=root,
                file=location or "model.onnx",
                hint="Rebuild the bundle with slipstream (it writes external data to model.onnx.data), or restore "
                "it from a trusted copy.",
            )


def inline_external_data(root: Path, model: onnx.ModelProto, data: bytes) -> None:
    """Fill every external tensor from ``data`` (the verified side file) in place; paths are never opened."""
    for tensor in all_tensors(model):
        if not _uses_external(tensor):
            continue
        fields = _fields(tensor)
        offset = int(fields.get("offset", "0") or 0)
        length = int(fields["length"]) if fields.get("length") else len(data) - offset
        if offset < 0 or length < 0 or offset + length > len(data):
            raise IntegrityError(
                f"Bundle '{root}': model.onnx says tensor '{tensor.name}' lies at bytes {offset}..{offset + length} "
                f"of {DATA_FILE}, which has {len(data)} bytes.",
                path=root,
                file=DATA_FILE,
                hint="Rebuild the bundle from its source.",
            )
        tensor.raw_data = data[offset : offset + length]
        del tensor.external_data[:]
        tensor.ClearField("data_location")
