"""Hostile clients against `slipstream serve` on loopback (issue 18): what they cost everyone else.

Sections (each against its own server process, tiny MLP, one JSON sample per request, wrk -t1 -c8 as the
normal traffic, baseline and attack back to back):

* the cost of the HTTP limits: the limited protocol vs uvicorn's plain httptools, interleaved, c = 1, 8, 64;
* a header bomb: 20 connections, each sending an unterminated 64 MB header, again and again; the server's
  RSS growth and the normal p99 during it;
* 300 slowloris connections (a header line every 0.5 s) and 300 slow bodies (a byte every 0.5 s): the
  normal p50 during them, and how long each slow connection lived against its read timeout;
* one slow client (a valid infer body, one byte every 0.5 s): the others' p50;
* then benchmarks/hostile_fuzz.py and benchmarks/hostile_monitor.py, when present (each runs its own server).

Everything connects to 127.0.0.1 only and every loop is bounded: the script stops by itself. It prints the
CPU model and the command, writes benchmarks/results/hostile.md and replaces its section in BENCHMARKS.md.

    .venv/bin/python benchmarks/hostile.py --quick     # about 2 minutes
    .venv/bin/python benchmarks/hostile.py             # longer windows, 5 interleaved rounds
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import serving  # noqa: E402  (benchmarks/serving.py: server start/stop, wrk, CPU accounting)
from hostile_clients import INFER, Attack, RssSampler, bomb, protocol_cpu_us, rss_mb, slow  # noqa: E402

from slipstream.runtime.targets import cpu_model  # noqa: E402

TITLE = "Hostile clients (issue 18): benchmarks/hostile.py"


def wrk(port: int, seconds: float, work: Path, c: int = 8) -> dict[str, float]:
    return serving.run_wrk(f"http://127.0.0.1:{port}{INFER}", BODY, c, seconds, work)


BODY: dict[str, object] = {}


def server_cmd(bundle: Path, port: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(bundle), "--port", str(port),
        "--no-access-log", *extra,
    ]  # fmt: skip


def with_server(bundle: Path, extra: list[str], fn: Callable[[int, int], list[str]]) -> list[str]:
    port = serving.free_port()
    proc = serving.start(server_cmd(bundle, port, extra), port, "tiny")
    try:
        return fn(port, proc.pid)
    finally:
        serving.stop(proc)


# -- sections -----------------------------------------------------------------------------------------
def section_cost(bundle: Path, work: Path, seconds: float, rounds: int) -> list[str]:
    ports = {"limited": serving.free_port(), "plain httptools": serving.free_port()}
    extras = {"limited": [], "plain httptools": ["--no-http-limits"]}
    procs = {n: serving.start(server_cmd(bundle, p, extras[n]), p, "tiny") for n, p in ports.items()}
    lines = [
        "### The cost of the limits: limited protocol vs uvicorn's plain httptools",
        "",
        f"Both servers up at once; per concurrency, {rounds} interleaved rounds of {seconds:g} s each (the order "
        "alternates); req/s median (min-max over rounds), p50/p99 medians, server CPU per request (median), and "
        "the median over rounds of limited / plain req/s within the same round.",
        "",
        "| c | server | req/s median (min-max) | p50 ms | p99 ms | CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    micro = protocol_cpu_us(BODY, rounds * 2, 20_000)
    lim, plain = (statistics.median(v) for v in micro.values())
    paired = statistics.median(a - b for a, b in zip(*micro.values(), strict=True))
    print(f"in-process CPU µs/request: limited {lim:.2f}, plain {plain:.2f}, paired difference {paired:+.2f}")
    try:
        for port in ports.values():
            wrk(port, 2, work)  # warm-up
        for c in (1, 8, 64):
            got: dict[str, list[dict[str, float]]] = {n: [] for n in ports}
            for r in range(rounds):
                for name in list(ports)[r % 2 :] + list(ports)[: r % 2]:
                    cpu0 = serving.cpu_seconds(procs[name].pid)
                    res = wrk(ports[name], seconds, work, c)
                    res["cpu_us"] = (serving.cpu_seconds(procs[name].pid) - cpu0) * 1e6 / max(res["total"], 1)
                    got[name].append(res)
            for name, runs in got.items():
                rps = [x["rps"] for x in runs]
                lines.append(
                    f"| {c} | {name} | {statistics.median(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) | "
                    f"{statistics.median(x['p50'] for x in runs):.2f} | {statistics.median(x['p99'] for x in runs):.2f}"
                    f" | {statistics.median(x['cpu_us'] for x in runs):.0f} | {sum(int(x['errors']) for x in runs)} |"
                )
            ratio = statistics.median(a["rps"] / b["rps"] for a, b in zip(*got.values(), strict=True))
            lines.append(f"| {c} | limited / plain, paired | {ratio:.3f}× | | | | |")
            print(lines[-3], lines[-2], lines[-1], sep="\n", flush=True)
    finally:
        for proc in procs.values():
            serving.stop(proc)
    lines += [
        "",
        "In process, without sockets (the protocol object fed one JSON infer request at a time, a minimal ASGI app "
        f"answering, CPU time of {rounds * 2} interleaved rounds of 20,000 requests): "
        f"limited {lim:.2f} µs/request (min-max {min(micro['limited']):.2f}-{max(micro['limited']):.2f}), plain "
        f"{plain:.2f} µs ({min(micro['plain httptools']):.2f}-{max(micro['plain httptools']):.2f}); paired "
        f"difference {paired:+.2f} µs/request. This is the limits' own cost, far less sensitive to neighbours' "
        "load than req/s over loopback.",
        "",
    ]
    return lines


def rounds_of(
    port: int, work: Path, seconds: float, rounds: int, attack: Callable[[], Attack], settle_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Normal traffic alone, then beside the attack, ``rounds`` times; medians of each (neighbours drift)."""
    alone: list[dict[str, float]] = []
    beside: list[dict[str, float]] = []
    for _ in range(rounds):
        alone.append(wrk(port, seconds, work))
        with attack():
            time.sleep(settle_s)
            beside.append(wrk(port, seconds, work))
    keys = ("p50", "p99", "rps", "errors")
    return (
        {k: statistics.median(x[k] for x in alone) for k in keys},
        {k: statistics.median(x[k] for x in beside) for k in keys},
    )


def section_bomb(bundle: Path, work: Path, seconds: float, rounds: int) -> list[str]:
    def run(port: int, pid: int) -> list[str]:
        wrk(port, 2, work)  # warm-up: the baseline RSS includes what normal traffic allocates
        idle_peak = rss_mb(pid)
        stats: Counter[str] = Counter()
        with RssSampler(pid) as hit:
            base, during = rounds_of(
                port, work, seconds, rounds, lambda: Attack([bomb(port, stats) for _ in range(20)]), 0.2
            )
        growth = hit.peak - idle_peak
        ok = growth <= 20 and during["p99"] <= 2 * base["p99"]
        return [
            "### Header bomb: 20 connections × 64 MB unterminated header, repeated",
            "",
            "Each of 20 attackers opens a connection, sends a request line and `X-Bomb: ` followed by 64 MB "
            "without an end of line (64 KB writes), waits 0.5 s after the connection breaks, and starts again. "
            f"{rounds} rounds of {seconds:g} s normal traffic alone, then beside the bomb; medians.",
            "",
            f"- attempts {stats['attempts']}; MB written before the server broke the connection, socket buffers "
            f"included: {stats['KB written'] / 1024:,.0f} in all; answers read back: "
            + ", ".join(f"{k[7:]} {v}" for k, v in sorted(stats.items()) if k.startswith("answer")),
            f"- server RSS: {idle_peak:.1f} MB after warm-up, peak {hit.peak:.1f} MB over all rounds: growth "
            f"{growth:+.1f} MB (must be ≤ 20 MB)",
            f"- normal requests (wrk -c8): p99 {base['p99']:.2f} ms alone, {during['p99']:.2f} ms beside the bomb "
            f"({during['p99'] / base['p99']:.2f}×, must be ≤ 2×); p50 {base['p50']:.2f} → {during['p50']:.2f} ms; "
            f"req/s {base['rps']:,.0f} → {during['rps']:,.0f}; errors {int(base['errors'])} → {int(during['errors'])}",
            f"- verdict: RSS {'PASS' if growth <= 20 else 'FAIL'}, p99 {'PASS' if ok else 'FAIL'}",
            "",
        ]

    return with_server(bundle, [], run)


def section_slow(bundle: Path, work: Path, seconds: float, rounds: int, timeouts: dict[str, float]) -> list[str]:
    extra = [
        "--header-timeout", str(timeouts["header"]), "--body-idle-timeout", str(timeouts["idle"]),
        "--body-timeout", str(timeouts["body"]),
    ]  # fmt: skip

    def run(port: int, pid: int) -> list[str]:
        wrk(port, 2, work)
        stats: Counter[str] = Counter()
        loris: list[float] = []
        bodies: list[float] = []

        def attack() -> Attack:
            tasks = [slow(port, "slowloris", loris, stats) for _ in range(300)]
            return Attack(tasks + [slow(port, "slow body", bodies, stats) for _ in range(300)])

        base, during = rounds_of(port, work, seconds, rounds, attack, 1.0)
        one: list[float] = []
        alone, single = rounds_of(
            port, work, seconds, rounds, lambda: Attack([slow(port, "slow client", one, stats)]), 0.5
        )
        limit_loris, limit_body = timeouts["header"], timeouts["body"]
        ok_p50 = during["p50"] <= 1.5 * base["p50"]
        ok_close = bool(loris and bodies) and max(loris) <= limit_loris + 0.5 and max(bodies) <= limit_body + 0.5
        return [
            "### 300 slowloris + 300 slow-body connections, then one slow client",
            "",
            f"Server: `--header-timeout {timeouts['header']:g} --body-idle-timeout {timeouts['idle']:g} "
            f"--body-timeout {timeouts['body']:g}`; each slow connection sends a header line (slowloris) or one body "
            "byte every 0.5 s and reconnects once the server closes it. Lifetimes are timed by the attacking client "
            "(from its connect to the server's answer), so they include that client's own event-loop lag: 600 "
            "coroutines on the shared cores. "
            f"{rounds} rounds of {seconds:g} s normal traffic alone, then beside the slow connections; medians.",
            "",
            f"- normal requests (wrk -c8) p50: {base['p50']:.2f} ms alone, {during['p50']:.2f} ms beside the 600 "
            f"slow connections ({during['p50'] / base['p50']:.2f}×, must be ≤ 1.5×); p99 {base['p99']:.2f} → "
            f"{during['p99']:.2f} ms; req/s {base['rps']:,.0f} → {during['rps']:,.0f}; errors "
            f"{int(during['errors'])}",
            f"- slowloris connections closed by the server: {len(loris)}, lifetime median "
            f"{_med(loris):.2f} s, max {max(loris, default=0):.2f} s (header timeout {limit_loris:g} s)",
            f"- slow-body connections closed by the server: {len(bodies)}, lifetime median {_med(bodies):.2f} s, "
            f"max {max(bodies, default=0):.2f} s (body timeout {limit_body:g} s after the head)",
            "- answers: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if "slow client" not in k),
            f"- verdict: p50 {'PASS' if ok_p50 else 'FAIL'}, closed within the timeout (+0.5 s) "
            f"{'PASS' if ok_close else 'FAIL'}",
            f"- one slow client (a valid infer body, a byte every 0.5 s), same rounds: the others' p50 "
            f"{alone['p50']:.2f} ms alone, {single['p50']:.2f} ms beside it ({single['p50'] / alone['p50']:.2f}×); "
            f"p99 {alone['p99']:.2f} → {single['p99']:.2f} ms; it was closed {len(one)} times, answers: "
            + (", ".join(f"{k[12:]} {v}" for k, v in sorted(stats.items()) if "slow client" in k) or "none"),
            "",
        ]

    return with_server(bundle, extra, run)


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def section_other(module: str, quick: bool) -> list[str]:
    """A section another script owns (``def section(quick: bool) -> list[str]``); missing is not fatal."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        print(f"{module}: missing (benchmarks/{module}.py not found), section skipped", flush=True)
        return [f"### {module}", "", f"- not run: benchmarks/{module}.py is missing", ""]
    try:
        lines: list[str] = mod.section(quick)
    except Exception as exc:  # one failing section must not lose the others' results
        print(f"{module}: failed: {exc!r}", flush=True)
        return [f"### {module}", "", f"- failed: {type(exc).__name__}: {exc}", ""]
    return [*lines, ""]


def write(lines: list[str]) -> None:
    text = "\n".join(lines).rstrip() + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "hostile.md").write_text(text, encoding="utf-8")
    md = ROOT / "BENCHMARKS.md"
    section = "#" + text  # one level down, as run_all.py assembles it
    old = md.read_text(encoding="utf-8") if md.exists() else ""
    start = old.find(f"\n## {TITLE}\n")
    if start < 0:
        new = old.rstrip() + "\n\n" + section
    else:
        end = old.find("\n## ", start + 1)
        new = old[: start + 1] + section + (old[end:] if end >= 0 else "")
    md.write_text(new, encoding="utf-8")
    print(f"wrote {HERE / 'results' / 'hostile.md'} and its section of {md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Short windows (about 2 minutes in all).")
    parser.add_argument(
        "--only",
        default="cost,bomb,slow,fuzz,monitor",
        help="Sections to run, comma-separated (then nothing is written).",
    )
    args = parser.parse_args()
    # A SIGTERM (a timeout, a CI job stopping) runs the finally blocks below, which stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install -y wrk")
    only = set(args.only.split(","))
    command = (
        "python benchmarks/hostile.py"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only != parser.get_default("only") else "")
    )
    seconds, rounds = (3.0, 2) if args.quick else (8.0, 3)
    timeouts = {"header": 1.5, "idle": 1.5, "body": 3.0} if args.quick else {"header": 5.0, "idle": 5.0, "body": 8.0}
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs\nCommand: {command}", flush=True)
    lines = [
        f"# {TITLE}",
        "",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average at the start "
        f"{os.getloadavg()[0]:.1f}. Command: `{command}`. All traffic on 127.0.0.1; the attackers run in "
        "the benchmark's process, wrk (-t1) and the server each in their own, all on the same cores, so the "
        "attackers' own CPU is part of what the normal traffic competes with.",
        "",
    ]
    work = Path(tempfile.mkdtemp(prefix="slipstream-hostile-"))
    _, bundle, body = serving.tiny_mlp(work)
    BODY.update(body)
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("cost", lambda: section_cost(bundle, work, 1.0 if args.quick else 3.0, 3 if args.quick else 5)),
        ("bomb", lambda: section_bomb(bundle, work, seconds, rounds)),
        ("slow", lambda: section_slow(bundle, work, seconds, rounds, timeouts)),
        ("fuzz", lambda: section_other("hostile_fuzz", args.quick)),
        ("monitor", lambda: section_other("hostile_monitor", args.quick)),
    ]
    try:
        for name, run in sections:
            if name in only:
                started = time.monotonic()
                got = run()
                print("\n".join(got), f"({name}: {time.monotonic() - started:.0f} s)", sep="\n", flush=True)
                lines += got
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if only == set(parser.get_default("only").split(",")):
        write(lines)
    else:  # a partial run must not replace the recorded section with fewer results
        print("--only: a partial run; BENCHMARKS.md and benchmarks/results/hostile.md left as they were")


if __name__ == "__main__":
    main()
