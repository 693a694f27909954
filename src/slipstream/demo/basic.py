"""The embedded default job: build a model, convert it with proof, inspect it, benchmark it.

This is the first vertical slice; the full demo (train, build under a budget, serve, monitor) grows
from here as those stages land.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.rule import Rule

from slipstream.artifact.bundle import MODEL_FILE, Bundle
from slipstream.artifact.summary import summarize
from slipstream.cli.output import console
from slipstream.cli.render import render_bench, render_summary
from slipstream.errors import IntegrityError
from slipstream.evaluate.bench import BenchSettings, bench
from slipstream.importers import convert
from slipstream.runtime import Engine


def build_mlp(sizes: tuple[int, ...] = (64, 256, 256, 10), *, seed: int = 0) -> onnx.ModelProto:
    """An MLP classifier with He-initialised weights, a dynamic batch axis and softmax output."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prev = "pixels"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = np.zeros(fan_out, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        out = f"fc{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [out], name=f"fc{i}"))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
        else:
            prev = out
    nodes.append(helper.make_node("Softmax", [prev], ["probabilities"], axis=-1, name="softmax"))
    graph = helper.make_graph(
        nodes,
        "demo_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="slipstream-demo")
    model.ir_version = 8
    return model


def run_demo(workdir: Path) -> Bundle:
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "mlp.onnx"
    bundle_dir = workdir / "mlp-bundle"

    console.print(Rule("1 · build a model"))
    onnx.save_model(build_mlp(), str(source))
    console.print(f"wrote {source} (MLP 64→256→256→10, dynamic batch)", highlight=False)

    console.print(Rule("2 · convert it into a bundle"))
    bundle = convert(source, bundle_dir, name="demo-mlp", overwrite=True)
    console.print(f"[green]✓[/] bundle at {bundle.path}: checker passed, hashes recorded", highlight=False)

    console.print(Rule("3 · inspect it"))
    render_summary(summarize(Bundle.load(bundle_dir)))

    console.print(Rule("4 · prove tampering is caught"))
    tampered = workdir / "mlp-bundle-tampered"
    shutil.rmtree(tampered, ignore_errors=True)
    shutil.copytree(bundle_dir, tampered)
    data = bytearray((tampered / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / MODEL_FILE).write_bytes(bytes(data))
    try:
        Bundle.load(tampered)
    except IntegrityError as exc:
        console.print(f"[green]✓[/] refused a copy with one flipped byte: {exc.message}", highlight=False)
    else:  # pragma: no cover - the check above is the point of this stage
        raise RuntimeError("a tampered bundle loaded without an integrity error")
    shutil.rmtree(tampered)

    console.print(Rule("5 · benchmark it"))
    with console.status("timing batch 1, 8, 32…"):
        report = bench(lambda: Engine(bundle), BenchSettings(batch_sizes=(1, 8, 32), max_time_s=2.0))
    render_bench(report)

    console.print(Rule("next"))
    console.print(
        "Try it on your own model:\n"
        "  slipstream convert model.onnx -o my-bundle\n"
        "  slipstream inspect my-bundle\n"
        "  slipstream bench my-bundle --batch 1,8,32",
        highlight=False,
    )
    return bundle
