"""engine.openvino: run the bundle on OpenVINO at an explicit precision (the model's bytes are unchanged).

The step records the choice (``resolved["engine.openvino"]``: engine, precision, the CPU features it needs
and those of the machine it was made on); every consumer of the bundle opens it through
:func:`slipstream.runtime.open_engine`, which reads that choice. A QDQ model (after ``quantize.static`` or
``quantize.nncf``) runs as int8 on OpenVINO, with the layers left in float at ``precision``.

The runner's fidelity check compares the ONNX models, which are the same; what the engine does to the
numbers (bf16, OpenVINO's int8 kernels) is measured by the build like any candidate's quality.
"""

from __future__ import annotations

import onnx
from pydantic import Field, JsonValue

from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.tolerance import Tolerance
from slipstream.runtime.choice import InferencePrecision, make_choice


class EngineOpenVinoConfig(PassConfig):
    precision: InferencePrecision = Field(
        default="f32",
        description="OpenVINO's inference precision for layers not quantized: f32, or bf16 (fast only with "
        "AMX-BF16 or AVX512-BF16; recorded as a need of the bundle).",
    )


class EngineOpenVino(OnnxPass[EngineOpenVinoConfig]):
    name = "engine.openvino"
    version = 1
    Config = EngineOpenVinoConfig
    tolerance = Tolerance(max_rel_error=0.0)  # the ONNX model is passed through byte for byte

    def apply(self, model: onnx.ModelProto, config: EngineOpenVinoConfig, ctx: PassContext) -> PassOutput:
        choice = make_choice(ctx.bundle.manifest, "openvino", config.precision)
        resolved: dict[str, JsonValue] = choice.model_dump(mode="json", exclude={"measured"})
        warnings = []
        if choice.needs_any and not any(choice.cpu_features.get(f) for f in choice.needs_any):
            warnings.append(
                f"this CPU ({choice.cpu_model}) has none of {', '.join(choice.needs_any)}: OpenVINO runs "
                f"{choice.precision} here without them"
                + (" (a bf16 hint compiles to f32)" if config.precision == "bf16" else "")
                + "; measure it here, or build on the CPU it will serve on"
            )
        return PassOutput(model=model, resolved=resolved, warnings=warnings)
