from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from slipstream.evaluate.flops import count_work, estimate_peak_gflops
from tests.onnx_models import build_mlp


def test_gemm_work_scales_with_batch() -> None:
    model = build_mlp((8, 16, 4))
    one = count_work(model, {"pixels": (1, 8)})
    assert one.flops == 2 * (8 * 16 + 16 * 4)
    assert count_work(model, {"pixels": (5, 8)}).flops == 5 * one.flops
    assert one.counted_ops == {"Gemm": 2} and one.uncounted_nodes == 0


def test_conv_and_matmul_work() -> None:
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.zeros((8, 5), np.float32), "m")
    shape = numpy_helper.from_array(np.array([0, 4, 8, 8], np.int64), "s")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["c", "s"], ["r"]),
            helper.make_node("MatMul", ["r", "m"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w, m, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    work = count_work(model, {"x": (2, 3, 8, 8)})
    conv = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    matmul = 2 * (2 * 4 * 8 * 5) * 8
    assert work.flops == conv + matmul
    assert work.counted_ops == {"Conv": 1, "MatMul": 1}


@pytest.mark.parametrize(
    ("vendor", "flags", "per_cycle"),
    [("AuthenticAMD", "fma avx2 avx512f", 32), ("GenuineIntel", "fma avx2 avx512f", 64), ("X", "sse2", 8)],
)
def test_peak_estimate_says_how(vendor: str, flags: str, per_cycle: int) -> None:
    cpuinfo = f"vendor_id\t: {vendor}\ncpu MHz\t\t: 2500.000\nflags\t\t: {flags}\n"
    peak = estimate_peak_gflops(cpuinfo, cores=2)
    assert peak.gflops == pytest.approx(2 * 2.5 * per_cycle)
    assert "2 physical cores × 2500 MHz" in peak.method and f"{per_cycle} fp32 FLOPs/cycle" in peak.method
