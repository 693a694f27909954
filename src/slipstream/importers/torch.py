"""PyTorch → bundle: load the model, export it to ONNX, prove parity against torch eager, write the bundle.

The dynamo exporter (``torch.export`` + ``torch.onnx``) is the default; the TorchScript exporter runs
when asked for, and for TorchScript sources, which only it can read. The batch axis of every input is
dynamic, and so is every axis the caller declares; the ONNX dims carry the caller's symbol names.
Example inputs given as a dict are matched to forward() by argument name. A transformers model is
exported through a view that turns its cache off and returns its logits, with a dynamic sequence (see
:mod:`slipstream.importers.transformers_dir`). torch is imported here only, and lazily.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Unpack

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.tensor import Dim
from slipstream.errors import ConfigError, ConversionError, MissingDependencyError
from slipstream.importers.finish import ImportJob, finish_import
from slipstream.importers.framing import Framing, ImportFraming, SampleData, match_sample_names
from slipstream.importers.parity import Reference
from slipstream.importers.torch_errors import export_failure, quiet_export
from slipstream.importers.torch_inputs import (
    MISSING_EXAMPLES_HINT,
    DynamicAxes,
    bind_examples,
    examples_from_shapes,
    parse_shape,
    resolve_axes,
    widen_examples,
)
from slipstream.importers.torch_sources import TorchSource, load_torch_source
from slipstream.importers.transformers_dir import (
    SEQUENCE,
    example_tokens,
    is_transformers_model,
    text_parity_lengths,
    transformers_view,
)

if TYPE_CHECKING:
    import torch

STEP_NAME = "import.torch@1"
Exporter = Literal["dynamo", "torchscript"]
# The TorchScript exporter needs an explicit opset; 17 is the newest it supports fully.
TORCHSCRIPT_DEFAULT_OPSET = 17


class TorchExportSettings(BaseModel):
    """How a PyTorch model was exported; recorded in the lineage step and the manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    exporter: Exporter = Field(description="dynamo (torch.export + torch.onnx) or the legacy TorchScript exporter.")
    exporter_reason: str = Field(description="Why this exporter was used.")
    opset: int | None = Field(description="Requested ai.onnx opset; None means the exporter's default.")
    input_names: tuple[str, ...] = Field(description="Graph input names, the forward() argument names.")
    output_names: tuple[str, ...] = Field(description="Graph output names.")
    dynamic_axes: dict[str, dict[int, str]] = Field(description="input name -> axis -> symbol of dynamic axes.")
    example_shapes: dict[str, list[int]] = Field(description="Shapes of the example inputs the export traced.")


def require(package: str, feature: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise MissingDependencyError(package, extra="torch", feature=feature)


def import_torch(
    source: object,
    output: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    input_shapes: Sequence[str | Sequence[Dim]] | None = None,
    input_dtypes: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | Sequence[str] | None = None,
    exporter: Exporter | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    trust_pickle: bool = False,
    **framing: Unpack[ImportFraming],
) -> Bundle:
    """Convert a PyTorch model (module, entry point, TorchScript .pt, torch.export .pt2) into a bundle."""
    frame = Framing.begin(framing)
    require("torch", "Converting a PyTorch model")
    import torch

    src = load_torch_source(source, trust_pickle=trust_pickle)
    sample, opset = frame.sample, frame.opset
    chosen, reason = choose_exporter(exporter, src)
    if chosen == "dynamo":
        require("onnxscript", "The dynamo ONNX exporter")
    exported = isinstance(src.model, torch.export.ExportedProgram)
    if exported and (input_shapes or dynamic_axes):
        raise ConfigError(
            "A torch.export program carries its own example inputs and dynamic shapes; "
            "--input-shape and --dynamic-axis do not apply to it.",
            field="dynamic_axis",
            hint="Declare dynamic shapes when calling torch.export.export, then save the program again.",
        )
    module = src.model.module() if exported else src.model
    shapes = [parse_shape(s) if isinstance(s, str) else tuple(s) for s in input_shapes or ()]
    examples = _pick_examples(example_inputs, src, shapes, input_dtypes or (), sample, module)
    source_module = module
    module, names, args = bind_examples(module, examples)
    # A transformers model is wrapped whole, whatever bind_examples did: its own keywords, no cache, one output.
    view = None if exported else transformers_view(source_module, names, args, output_names)
    if view is not None:  # a transformers model: no cache, its logits (or hidden states), dynamic sequence
        module, picked = view
        output_names = picked if output_names is None else output_names
        dynamic_axes = dynamic_axes or [f"1={SEQUENCE}"]
        frame = replace(frame, parity_lengths=frame.parity_lengths or text_parity_lengths(source_module))
    if input_names is not None:
        if len(input_names) != len(args):
            raise ConfigError(
                f"Got {len(input_names)} input names for {len(args)} example inputs.", field="input_names"
            )
        names = list(input_names)
    if sample is not None:
        match_sample_names(sample, names)  # a sample for another model fails now, not after the export
    axes = {} if exported else resolve_axes(names, args, shapes=shapes, declared=dynamic_axes)
    if not exported:
        args = widen_examples(args, names, axes)

    with _eval_mode(None if exported else module):
        leaves = _dry_run(module, args, names, src)
        outs = list(output_names) if output_names is not None else default_output_names(module, args, leaves)
        if len(outs) != len(leaves):
            raise ConfigError(
                f"Got {len(outs)} output names; the model returns {len(leaves)} tensors.", field="output_names"
            )
        with quiet_export():
            try:
                if chosen == "dynamo":
                    proto = _export_dynamo(src.model if exported else module, args, names, axes, outs, opset)
                else:
                    proto = _export_torchscript(module, args, names, axes, outs, opset)
            except ConversionError:
                raise
            except Exception as exc:  # exporters raise many unrelated types; translate to one error
                raise export_failure(exc, chosen, module, args, opset, src.path) from exc
        if exported:
            axes = _axes_of_program(proto)
        _name_dims(proto, axes, src.path)
        _check_output_names(proto, outs, src.path)
        settings = TorchExportSettings(
            exporter=chosen,
            exporter_reason=reason,
            opset=opset,
            input_names=tuple(names),
            output_names=tuple(outs),
            dynamic_axes=axes,
            example_shapes={n: list(t.shape) for n, t in zip(names, args, strict=True)},
        )
        recorded = settings.model_dump(mode="json")
        job = ImportJob(
            framework="torch",
            step_name=STEP_NAME,
            default_name=src.name,
            source_path=src.path,
            source_sha256=src.sha256,
            resolved={
                "exporter": chosen,
                "exporter_reason": reason,
                "dynamic_axes": recorded["dynamic_axes"],
                "source_kind": src.kind,
                "torch_version": torch.__version__,
                **src.details,
            },
            step_config=recorded,
        )
        return finish_import(
            proto, output, job, frame, reference=torch_reference(module, names, outs),
            reference_name=f"torch eager ({src.kind})",
        )  # fmt: skip


@contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Export and prove parity in eval mode (dropout off, batch-norm running stats); restore the caller's mode."""
    if module is None:
        yield
        return
    was_training = bool(module.training)
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def choose_exporter(requested: Exporter | None, src: TorchSource) -> tuple[Exporter, str]:
    import torch

    scripted = isinstance(src.model, torch.jit.ScriptModule)
    if requested == "dynamo" and scripted:
        raise ConfigError(
            "The dynamo exporter cannot read a TorchScript module.",
            field="exporter",
            hint="Use --exporter torchscript, or give the Python model (an entry point FILE.py:FACTORY).",
        )
    if requested == "torchscript" and isinstance(src.model, torch.export.ExportedProgram):
        raise ConfigError(
            "The TorchScript exporter cannot read a torch.export program.",
            field="exporter",
            hint="Use the default dynamo exporter for .pt2 files.",
        )
    if requested is not None:
        return requested, "requested"
    if scripted:
        return "torchscript", "default for a TorchScript source (dynamo cannot read TorchScript)"
    return "dynamo", "default"


def _pick_examples(
    given: Any,
    src: TorchSource,
    shapes: Sequence[tuple[Dim, ...]],
    dtypes: Sequence[str],
    sample: SampleData | None,
    module: Any,
) -> Any:
    import torch

    if given is not None:
        return given
    if shapes:
        return examples_from_shapes(shapes, dtypes)
    if src.example_inputs is not None:
        return src.example_inputs
    if sample is not None:
        return {k: torch.from_numpy(np.array(v[:2])) for k, v in sample.items()}
    if is_transformers_model(module):
        return example_tokens(module)  # what its tokenizer would give: ids in the vocabulary, masks of ones
    raise ConfigError(
        f"PyTorch export runs the model once on example inputs, and none were given for '{src.path or src.name}'.",
        field="example_inputs",
        hint=MISSING_EXAMPLES_HINT,
    )


def _dry_run(module: Any, args: tuple[Any, ...], names: Sequence[str], src: TorchSource) -> list[torch.Tensor]:
    """Run the model once on the example inputs; a failure here is the user's inputs or model, said plainly."""
    import torch

    try:
        with torch.no_grad():
            return _tensor_leaves(module(*args))
    except Exception as exc:  # the user's forward() can raise anything
        shapes = ", ".join(f"{n}: {list(t.shape)} {t.dtype}" for n, t in zip(names, args, strict=True))
        raise ConversionError(
            f"The model failed on its example inputs ({shapes}): {type(exc).__name__}: {exc}",
            source=src.path,
            hint="Give one --input-shape (and --input-dtype) per forward() argument, matching what the model "
            "expects; or provide example inputs from a companion function or example_inputs=.",
        ) from exc


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def default_output_names(module: Any, args: tuple[Any, ...], leaves: Sequence[Any]) -> list[str]:
    """``output`` for one tensor; the keys of a flat dict of tensors; else ``output_0``, ``output_1``..."""
    import torch

    if len(leaves) == 1:
        return ["output"]
    with torch.no_grad():
        out = module(*args)
    if isinstance(out, Mapping) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out]
    return [f"output_{i}" for i in range(len(leaves))]


def torch_reference(module: Any, names: Sequence[str], outs: Sequence[str]) -> Reference:
    """The source model as a function of numpy inputs, for the parity proof."""
    import torch

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [torch.from_numpy(np.array(feeds[n])) for n in names]  # np.array: a writable copy
        with torch.no_grad():
            leaves = _tensor_leaves(module(*tensors))
        return {n: t.detach().cpu().numpy() for n, t in zip(outs, leaves, strict=True)}

    return run


def _export_dynamo(
    model: Any, args: tuple[Any, ...], names: list[str], axes: DynamicAxes, outs: list[str], opset: int | None
) -> onnx.ModelProto:
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        # Dim.DYNAMIC lets torch.export infer each axis' range (a BERT's seq is capped at 512) instead of
        # failing on a named Dim's default bounds; the ONNX dims are renamed to the caller's symbols after.
        dynamic = tuple(dict.fromkeys(axes.get(n, {}), torch.export.Dim.DYNAMIC) or None for n in names)
        program = torch.export.export(model, args, dynamic_shapes=dynamic, strict=False)
    onnx_program = torch.onnx.export(
        program, dynamo=True, input_names=names, output_names=outs, opset_version=opset, optimize=True, verbose=False
    )
    if onnx_program is None:  # only None when writing to a file, which this call does not do
        raise ConversionError("torch.onnx.export returned no program.")
    return onnx_program.model_proto


def _export_torchscript(
    model: Any, args: tuple[Any, ...], names: list[str], axes: DynamicAxes, outs: list[str], opset: int | None
) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        args,
        buffer,  # type: ignore[arg-type]  # the exporter writes to any binary file object
        dynamo=False,
        input_names=names,
        output_names=outs,
        dynamic_axes={n: dict(a) for n, a in axes.items() if a},
        opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
    )
    return onnx.load_from_string(buffer.getvalue())


def _axes_of_program(proto: onnx.ModelProto) -> DynamicAxes:
    """For a .pt2 source: the symbolic axes the program declared; axis 0 is called ``batch``."""
    axes: DynamicAxes = {}
    for info in proto.graph.input:
        dims = info.type.tensor_type.shape.dim
        found = {i: d.dim_param for i, d in enumerate(dims) if d.dim_param}
        if 0 in found:
            found[0] = "batch"
        axes[info.name] = found
    return axes


def _name_dims(proto: onnx.ModelProto, axes: DynamicAxes, source: str | None) -> None:
    """Rename the exporter's symbols (``s77``) to the declared ones; a declared axis that came out fixed fails."""
    mapping: dict[str, str] = {}
    baked: list[str] = []
    for info in proto.graph.input:
        dims = info.type.tensor_type.shape.dim
        for axis, symbol in axes.get(info.name, {}).items():
            if dims[axis].HasField("dim_value"):
                baked.append(f"{info.name} axis {axis} ('{symbol}') came out fixed at {dims[axis].dim_value}")
            elif dims[axis].dim_param:
                mapping.setdefault(dims[axis].dim_param, symbol)
    if baked:
        raise ConversionError(
            "The export baked declared dynamic axes in as constants: " + "; ".join(baked) + ".",
            source=source,
            hint="The model's code fixes that size (e.g. a reshape to a constant or a Python int from .shape); "
            "make the code size-agnostic, or declare only the axes that really vary.",
        )
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in mapping) + r")\b")
    for info in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in info.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: mapping[m.group(1)], d.dim_param)


def _check_output_names(proto: onnx.ModelProto, outs: Sequence[str], source: str | None) -> None:
    produced: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.output:
            produced[name] = produced.get(name, 0) + 1
    clashes = [n for n in outs if produced.get(n, 0) > 1]
    if clashes:
        raise ConversionError(
            f"Output name(s) {clashes} clash with values the exporter created inside the graph "
            "(onnxruntime would refuse the model: 'Duplicate definition').",
            source=source,
            hint="Choose other output names (output_names=[...] / --output-name), e.g. 'sentence_embedding'.",
        )
