"""The gRPC section of the serving benchmark: gRPC against REST, binary tensors on both.

One slipstream server with --port and --grpc-port, driven in interleaved slices by wrk (REST, the binary
tensor extension) and benchmarks/grpc_load.py (gRPC, raw_input_contents): the tiny MLP at each concurrency
and a 1 MB tensor input. Run through ``python benchmarks/serving.py --grpc`` or ``--grpc-only``; results go
to benchmarks/results/serving-grpc.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ROOT, Row, cpu_seconds, free_port, start, stop, wrk_script

from slipstream.demo import build_mlp
from slipstream.importers import import_onnx
from slipstream.runtime.targets import cpu_model

# -- gRPC against REST, binary tensors on both -----------------------------------------------------------
EMPTY = "grpc.aio, empty handler (floor)"  # benchmarks/baselines/grpc_empty.py, driven by grpc_load
GRPC_MODELS = {"tiny": ("pixels", [1, 64]), "big": ("x", [1, 262_144])}  # big: one 1 MiB FP32 tensor per request


def grpc_repository(work: Path) -> Path:
    """tiny (the MLP above) and big (a mean over a 1 MiB input: the transport is the whole cost)."""
    from onnx import TensorProto, helper

    root = work / "grpc-repo"
    tiny = work / "grpc-tiny.onnx"
    onnx.save_model(build_mlp((64, 256, 256, 10)), str(tiny))
    import_onnx(tiny, root / "tiny" / "1", name="tiny")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=1, axes=[1])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", GRPC_MODELS["big"][1][1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
    )
    big = work / "grpc-big.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(big))
    import_onnx(big, root / "big" / "1", name="big")
    return root


def binary_wrk(work: Path, model: str) -> Path:
    """A wrk script POSTing the model's input with the binary tensor extension (JSON head + raw FP32)."""
    name, shape = GRPC_MODELS[model]
    size = int(np.prod(shape)) * 4
    head = json.dumps(
        {"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}]}
    )
    blob = np.random.default_rng(0).standard_normal(shape).astype(np.float32).tobytes()
    data = "".join(f"\\{b}" for b in blob) if size <= 4096 else f'" .. string.rep("\\0", {size}) .. "'
    script = work / f"binary-{model}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{len(head)}"\n'
        f'wrk.body = {json.dumps(head)} .. "{data}"\n'
    )
    return script


def run_grpc_load(target: str, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    name, shape = GRPC_MODELS[model]
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "grpc_load.py"), "--target", target, "--model", model,
        "--input", f"{name}:FP32:{'x'.join(map(str, shape))}", "-c", str(concurrency), "-d", str(seconds),
    ]  # fmt: skip
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    if result["errors"]:
        print(f"  grpc_load errors: {result['errors']} (first: {result['first_error']})", flush=True)
    return result  # type: ignore[no-any-return]


def run_h2load(target: str, model: str, concurrency: int, seconds: float, work: Path) -> dict[str, float]:
    """The same request as grpc_load's, framed for gRPC and sent by h2load (nghttp2's C client, wrk's peer).

    h2load counts HTTP statuses, not grpc-status trailers: the warm-up checks through grpc_load that this very
    request is answered OK. It reports no percentiles, so p50/p99 are left out (NaN) for it.
    """
    from grpc_load import request_bytes  # beside this file

    name, shape = GRPC_MODELS[model]
    message = request_bytes(model, [f"{name}:FP32:{'x'.join(map(str, shape))}"])
    body = work / f"{model}.grpc"
    body.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)  # uncompressed, length-prefixed
    out = subprocess.run(
        ["h2load", "-D", str(int(seconds)), "-c", str(concurrency), "-m", "1", "-t", "1", "-d", str(body),
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://{target}/inference.GRPCInferenceService/ModelInfer"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    total, failed, errored = (int(x) for x in done.groups())  # type: ignore[union-attr]
    return {"rps": rps, "total": total, "p50": float("nan"), "p99": float("nan"), "errors": failed + errored}


def bench_grpc(args: argparse.Namespace, work: Path) -> list[Row]:
    """One server, both protocols, interleaved slices; ``Row.paired`` = gRPC / REST req/s in the same round."""
    port, grpc_port = free_port(), free_port()
    cmd = [
        sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(grpc_repository(work)),
        "--port", str(port), "--grpc-port", str(grpc_port),
    ]  # fmt: skip
    proc = start(cmd, port, "tiny")
    floor_port = free_port()
    floor = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "baselines" / "grpc_empty.py"), "--port", str(floor_port)],
        stdout=subprocess.DEVNULL,
    )
    with grpc.insecure_channel(f"127.0.0.1:{floor_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    plan = [("tiny", c) for c in args.concurrency] + [("big", c) for c in args.big_concurrency]
    rows: list[Row] = []
    slice_s = max(1, int(args.duration / args.rounds))
    try:
        scripts = {m: binary_wrk(work, m) for m in GRPC_MODELS}
        for model in GRPC_MODELS:  # warm-up, and a check that both protocols answer 200
            url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
            for result in (
                wrk_script(url, scripts[model], 2, 1),
                run_grpc_load(f"127.0.0.1:{grpc_port}", model, 2, 1),
                run_grpc_load(f"127.0.0.1:{floor_port}", model, 2, 1),
            ):
                if result["errors"]:
                    raise RuntimeError(f"{model}: the warm-up got {result['errors']} errors")
        for model, c in plan:
            url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
            load = {
                "REST (wrk, binary ext.)": lambda: wrk_script(url, scripts[model], c, slice_s),  # noqa: B023
                "gRPC (grpc_load, raw)": lambda: run_grpc_load(f"127.0.0.1:{grpc_port}", model, c, slice_s),  # noqa: B023
                # The same calls to a grpc.aio server that does nothing: what grpcio's server costs on its own.
                EMPTY: lambda: run_grpc_load(f"127.0.0.1:{floor_port}", model, c, slice_s),  # noqa: B023
            }
            if shutil.which("h2load"):  # a C client as light as wrk: the Python one takes cores from the server
                load["gRPC (h2load, raw)"] = lambda: run_h2load(f"127.0.0.1:{grpc_port}", model, c, slice_s, work)  # noqa: B023
            samples: dict[str, list[Row]] = {name: [] for name in load}
            for r in range(args.rounds):
                for name in list(load)[r % len(load) :] + list(load)[: r % len(load)]:  # rotate who goes first
                    pid = floor.pid if name == EMPTY else proc.pid
                    cpu0 = cpu_seconds(pid)
                    result = load[name]()
                    cpu = (cpu_seconds(pid) - cpu0) * 1e6 / max(result["total"], 1)
                    samples[name].append(
                        Row(model, name, c, result["rps"], result["p50"], result["p99"], int(result["errors"]), cpu)
                    )
            rest = samples["REST (wrk, binary ext.)"]
            for name, got in samples.items():
                row = Row(
                    model, name, c, float(np.median([g.rps for g in got])), float(np.median([g.p50_ms for g in got])),
                    float(np.median([g.p99_ms for g in got])), sum(g.errors for g in got),
                    float(np.median([g.cpu_us_per_req for g in got])),
                    paired=float(np.median([g.rps / max(f.rps, 1e-9) for g, f in zip(got, rest, strict=True)])),
                )  # fmt: skip
                rows.append(row)
                print(
                    f"{model:5} {name:24} c={c:<3} {row.rps:9.0f} req/s  p50 {row.p50_ms:7.2f} ms  p99 "
                    f"{row.p99_ms:7.2f} ms  errors {row.errors}  server cpu {row.cpu_us_per_req:6.0f} µs/req  "
                    f"÷REST {row.paired:.2f}",
                    flush=True,
                )
    finally:
        stop(proc)
        stop(floor)
    write_grpc_report(args, rows)
    return rows


def write_grpc_report(args: argparse.Namespace, rows: list[Row]) -> None:
    command = " ".join(["python benchmarks/serving.py", *sys.argv[1:]])
    lines = [
        "# Serving: gRPC against REST on one slipstream server",
        "",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average at the end {os.getloadavg()[0]:.1f} "
        "(shared machine: req/s are noisy, the ratios inside one run and CPU µs/request much less so).",
        f"Command: `{command}`. One `slipstream serve --port P --grpc-port G` process (defaults: access log "
        "on, to /dev/null); each protocol gets the same interleaved slices. REST: wrk -t1, binary tensor "
        "extension. gRPC: benchmarks/grpc_load.py (grpc.aio, raw_input_contents, a few channels) and, where "
        "installed, h2load (nghttp2's C client, the same request bytes, one stream per connection like wrk; it "
        "reports no percentiles). The load clients share the machine's cores with the server.",
        "",
        "| model | protocol | c | req/s | p50 ms | p99 ms | errors | server CPU µs/req | gRPC ÷ REST req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.paired:.2f}" if r.server.startswith(("gRPC", "grpc")) else ""
        lines.append(
            f"| {r.model} | {r.server} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.errors} | {r.cpu_us_per_req:.0f} | {ratio} |".replace("| nan ", "| – ")
        )
    lines += [
        "",
        "tiny: the 64→256→256→10 MLP, one sample per request; big: one 1 MiB FP32 tensor (a mean).",
        f"'{EMPTY}': benchmarks/baselines/grpc_empty.py, a grpc.aio server (same uvloop, same channel options) "
        "whose ModelInfer returns a fixed empty reply without parsing the request, driven by the same "
        "grpc_load calls in the same interleaved slices: what grpcio's asyncio server costs per call on its own.",
    ]
    by = {(r.model, r.concurrency, r.server): r for r in rows}
    for (model, c, server), r in by.items():
        if server != EMPTY:
            continue
        ours, rest = by.get((model, c, "gRPC (grpc_load, raw)")), by.get((model, c, "REST (wrk, binary ext.)"))
        if ours is not None and rest is not None:
            lines.append(
                f"- {model} c={c}: slipstream gRPC / empty grpc.aio = {ours.rps / max(r.rps, 1e-9):.2f}× req/s; "
                f"the empty grpc.aio server / slipstream REST = {r.paired:.2f}× (server CPU {r.cpu_us_per_req:.0f} "
                f"vs {rest.cpu_us_per_req:.0f} µs per call)"
            )
    out = args.out.with_name("serving-grpc.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
