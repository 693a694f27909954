"""Deploy: what `slipstream export` writes for the edge and for a container, and how big it is.

  - edge: the winner of `slipstream build examples/digits-cnn.yaml` (built here, the auto ladder) and
    all-MiniLM-L6-v2 int8 (dynamic per-channel, the winner of examples/minilm/minilm.yaml) exported
    --to edge: .ort size against the bundle's model.onnx, operator types and nodes, the export's own parity
    check, and agreement with the bundle on real inputs (held-out digits; real sentences);
  - container: the installed size of a fresh venv holding exactly what the image installs (the Dockerfile's
    `pip install` line: the exported lock of slipstream[serve,monitor] plus the wheel), and that torch and
    tensorflow do not import there.

    .venv/bin/python benchmarks/deploy.py [--quick] [--skip-minilm] [--skip-venv] [--out benchmarks/results/deploy.md]

--quick (about a minute): the digits winner's edge export only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from slipstream.artifact import Bundle  # noqa: E402
from slipstream.deploy import DeployOptions, export  # noqa: E402
from slipstream.deploy.edge_ops import OPERATOR_SETS, graph_operators  # noqa: E402
from slipstream.runtime import Engine, Target  # noqa: E402
from slipstream.runtime.targets import cpu_model  # noqa: E402


def _load(path: Path, name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_winner(work: Path) -> tuple[Bundle, dict[str, np.ndarray], str]:
    from slipstream.build.recipe import load_recipe
    from slipstream.build.search import run_build
    from slipstream.demo.digits import held_out

    started = time.perf_counter()
    recipe = load_recipe(ROOT / "examples" / "digits-cnn.yaml")
    result = run_build(recipe.model_copy(update={"output": str(work / "digits-cnn")}))
    name = result.record.selection.winner if result.record.selection else "baseline"
    x, _ = held_out()
    (spec,) = result.winner.manifest.inputs
    note = f"digits CNN, build winner '{name}' (built here in {time.perf_counter() - started:.0f} s)"
    return result.winner, {spec.name: x.astype(np.float32)}, note


def minilm_int8(work: Path) -> tuple[Bundle, dict[str, np.ndarray], str]:
    import slipstream
    from slipstream.passes.recipe import optimize

    example = _load(ROOT / "examples" / "minilm" / "model.py", "minilm_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter and transformers deprecations, not ours
        baseline = slipstream.convert(
            example.build(), work / "minilm", example_inputs=example.example_inputs(), dynamic_axes=["1=seq"],
            output_names=["sentence_embedding"], name="minilm",
        )  # fmt: skip
    int8 = optimize(baseline, [("quantize.dynamic", {"per_channel": True})], work / "minilm-int8", cache=False)
    feeds = example.tokenize(example.SENTENCES)
    return int8, feeds, "all-MiniLM-L6-v2, int8 dynamic per-channel"


def edge_row(bundle: Bundle, feeds: dict[str, np.ndarray], note: str, work: Path) -> dict[str, Any]:
    out = work / f"edge-{bundle.manifest.name}"
    data = work / f"parity-{bundle.manifest.name}.npz"
    np.savez(data, **feeds)  # the export's own parity check runs on these real inputs too
    started = time.perf_counter()
    export(bundle.path, "edge", out, DeployOptions(parity_data=data))
    export_s = time.perf_counter() - started
    info = json.loads((out / "edge.json").read_text())
    names = [s.name for s in bundle.manifest.outputs]
    want = Engine(bundle, Target(intra_op_threads=1)).run(feeds, names)
    session = ort.InferenceSession(str(out / info["file"]), providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(names, feeds), strict=True))
    first = names[0]
    error = float(np.max(np.abs(want[first].astype(np.float64) - got[first])))
    agree = ""
    if want[first].ndim == 2 and want[first].shape[1] > 1 and "MiniLM" not in note:
        agree = f"{float(np.mean(want[first].argmax(1) == got[first].argmax(1))) * 100:.1f} % same class"
    else:
        a, b = want[first], got[first]
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        agree = f"min cosine {float(cos.min()):.6f}"
    rows = len(next(iter(feeds.values())))
    used = graph_operators(bundle.load_model(load_external_data=False))
    fits = [name for name, allowed in OPERATOR_SETS.items() if used <= allowed]
    return {
        "fits": ", ".join(fits) or "none",
        "model": note,
        "onnx_bytes": info["sizes"]["bundle_model_bytes"],
        "ort_bytes": info["sizes"]["ort_bytes"],
        "ops": info["sizes"]["operator_types"],
        "nodes": info["sizes"]["nodes"],
        "export_s": export_s,
        "real": f"{rows} rows: max |ort − bundle| {error:.2g}, {agree}",
    }


def venv_size(bundle: Bundle, work: Path) -> dict[str, Any]:
    ctx = work / "container"
    export(bundle.path, "container", ctx, DeployOptions())
    venv = work / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    text = (ctx / "Dockerfile").read_text().replace("\\\n", " ")
    (run,) = [line for line in text.splitlines() if line.startswith("RUN pip install")]
    command = run.removeprefix("RUN ").replace("/tmp/requirements.lock", str(ctx / "requirements.lock"))
    for wheel in (ctx / "wheels").iterdir():
        command = command.replace(f"/tmp/{wheel.name}", str(wheel))
    command = command.split("&& rm -f")[0].replace("pip ", f"{venv / 'bin' / 'pip'} ")
    started = time.perf_counter()
    subprocess.run(command, shell=True, check=True, capture_output=True)
    install_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    python = str(venv / "bin" / "python")
    absent = [m for m in ("torch", "tensorflow") if subprocess.run([python, "-c", f"import {m}"],
              capture_output=True, check=False).returncode != 0]  # fmt: skip
    pins = [x for x in (ctx / "requirements.lock").read_text().splitlines() if x and not x.startswith("#")]
    return {"size_mib": size / 2**20, "install_s": install_s, "pins": len(pins), "absent": absent}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Only the digits winner's edge export.")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-venv", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.md")
    args = ap.parse_args()
    command = "benchmarks/deploy.py " + " ".join(sys.argv[1:])
    print(f"CPU: {cpu_model()} · {os.cpu_count()} logical cores · {platform.machine()}")
    print(f"command: .venv/bin/python {command.strip()}")
    work = Path(tempfile.mkdtemp(prefix="slipstream-bench-deploy-"))
    try:
        digits = digits_winner(work)
        rows = [edge_row(*digits, work)]
        if not (args.quick or args.skip_minilm):
            rows.append(edge_row(*minilm_int8(work), work))
        venv = None if (args.quick or args.skip_venv) else venv_size(digits[0], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# Deploy: `slipstream export` for the edge and for a container",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores, {platform.machine()}; onnxruntime {ort.__version__}. "
        "Shared and noisy: export times are indicative only.",
        f"Command: `.venv/bin/python {command.strip()}`.",
        "",
        "### Edge (`--to edge`): ORT format, 'extended' graph optimizations",
        "",
        "| model | model.onnx | .ort | operator types | nodes | fits --operator-set | export s "
        "| vs the bundle on real inputs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['onnx_bytes'] / 1024:,.1f} KiB | {r['ort_bytes'] / 1024:,.1f} KiB | {r['ops']} | "
            f"{r['nodes']} | {r['fits']} | {r['export_s']:.1f} | {r['real']} |"
        )
    if venv is not None:
        lines += [
            "",
            "### Container (`--to container`): what the image installs, in a fresh venv",
            "",
            f"{venv['pins']} pinned packages (slipstream[serve,monitor]'s closure) plus the slipstream wheel: "
            f"**{venv['size_mib']:.0f} MiB** installed, in {venv['install_s']:.0f} s from the pip cache. "
            f"Not importable there: {', '.join(venv['absent']) or 'none (!)'}.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
