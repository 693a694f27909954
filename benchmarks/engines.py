"""Engines: the same bundle through Ray Serve (the `slipstream export --to ray` application) and `slipstream serve`.

Both serve one tiny MLP (64→256→256→10, one sample per request) with the same settings: API keys on
(wrk sends one), slipstream's batcher, access log on. `slipstream serve` is one process; the Ray side is a
local one-node Ray cluster running the exported application with ``--replicas`` replicas behind Ray's HTTP
proxy. wrk (Debian package) drives each over loopback in interleaved rounds, one server after the other,
so both go through the same stretches of neighbour load; the table keeps medians over rounds and the
median of the per-round ratio Ray ÷ direct. Results go to benchmarks/results/engines.md.

    python benchmarks/engines.py             # c=8 and 64, 30 s per server and concurrency in 5 rounds
    python benchmarks/engines.py --quick     # 6 s in 3 rounds: about 1.5 minutes with the cluster's start
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import serving  # noqa: E402  (benchmarks/serving.py: the tiny MLP, server start/stop, wrk)

from slipstream.deploy import DeployOptions, export  # noqa: E402
from slipstream.deploy.ray import CONFIG_FILE  # noqa: E402
from slipstream.runtime.targets import cpu_model  # noqa: E402
from slipstream.serve.guard import API_KEYS_ENV  # noqa: E402

ROOT = HERE.parent
KEY = "engines-benchmark-key-0123456789"
DIRECT = "slipstream serve"
RAY = "Ray Serve (export --to ray)"
FLOOR = "Ray Serve, empty ASGI app (floor)"
FLOOR_PREFIX = "/floor"


async def empty_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Ray's floor: an ASGI app that reads the body and answers a fixed JSON, no model, no checks."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"outputs":[]}'})


def build_empty_asgi() -> Any:
    return empty_asgi  # Serve calls a builder with no arguments; an ASGI function handed over directly fails


def wrk_script(work: Path, body: dict[str, object]) -> Path:
    script = work / "post-auth.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )
    return script


def wait_ok(url: str, body: dict[str, object], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code}: {answer.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 in {seconds:.0f} s (last: {last})")
        time.sleep(0.5)


def start_ray(bundle: Path, work: Path, replicas: int, port: int) -> object:
    """A one-node local Ray cluster running the exported application, deployed as `serve run` deploys it, and
    beside it (on FLOOR_PREFIX) an empty ASGI app: what Ray's proxy and actor call cost with no work behind."""
    import ray
    from click.testing import CliRunner
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.scripts import cli as serve_cli

    out = work / "ray-app"
    export(bundle, "ray", out, DeployOptions(replicas=replicas, port=port))
    os.environ[API_KEYS_ENV] = KEY  # the node (and so every replica) inherits it
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's CPUs are a scheduling resource: room for every replica and the floor's, whatever the machine has.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": replicas + 1})
    del os.environ[API_KEYS_ENV]
    # This driver stays connected with the working_dir (the export) as its runtime env, as `serve run` does,
    # but without streaming the replicas' logs here, which would cost this machine's CPU under load.
    ray.init(address=cluster.address, namespace="serve", runtime_env={"working_dir": str(out)}, log_to_driver=False)
    ran = CliRunner().invoke(serve_cli, ["run", str(out / CONFIG_FILE), "--non-blocking"])
    if ran.exit_code != 0:
        raise RuntimeError(f"serve run failed: {ran.output}")
    floor = serve.deployment(name="floor", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)(
        serve.ingress(build_empty_asgi)()
    )
    serve.run(floor.bind(), name="floor", route_prefix=FLOOR_PREFIX)
    return cluster


def stop_ray(cluster: object) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()  # type: ignore[attr-defined]


def measure(urls: dict[str, str], script: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    slice_s = max(1, int(args.duration / args.rounds))
    names = list(urls)
    for c in args.concurrency:
        samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # each round, another goes first
                samples[name].append(serving.wrk_script(urls[name], script, c, slice_s))
        for name in names:
            got = samples[name]
            ratio = [g["rps"] / max(d["rps"], 1e-9) for g, d in zip(got, samples[DIRECT], strict=True)]
            row = {
                "server": name, "c": c,
                "rps": float(np.median([g["rps"] for g in got])),
                "rps_min": min(g["rps"] for g in got), "rps_max": max(g["rps"] for g in got),
                "p50": float(np.median([g["p50"] for g in got])), "p99": float(np.median([g["p99"] for g in got])),
                "errors": int(sum(g["errors"] for g in got)), "ratio": float(np.median(ratio)),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name:34} c={c:<3} {row['rps']:8.0f} req/s (min {row['rps_min']:.0f}, max {row['rps_max']:.0f})  "
                f"p50 {row['p50']:7.2f} ms  p99 {row['p99']:7.2f} ms  errors {row['errors']}  "
                f"÷ direct {row['ratio']:.2f}",
                flush=True,
            )
    return rows


def write_report(path: Path, args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    import ray

    command = " ".join(["python benchmarks/engines.py", *sys.argv[1:]])
    lines = [
        "# Engines: Ray Serve against `slipstream serve`",
        "",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average at the end {os.getloadavg()[0]:.1f} "
        "(shared machine: req/s are noisy; the per-round ratio much less so).",
        f"Command: `{command}`. Ray {ray.__version__}: a local one-node cluster running the `slipstream export "
        f"--to ray` application with {args.replicas} replica(s) (one CPU each, the tuned threads) behind Ray's "
        "HTTP proxy; `slipstream serve` is one process. Same bundle (tiny MLP 64→256→256→10, one sample per "
        "request, JSON), same settings: API key on, slipstream's batcher, access log on. wrk -t1 on loopback "
        f"shares the cores; {args.rounds} interleaved rounds of {max(1, int(args.duration / args.rounds))} s per "
        "server and concurrency; medians over rounds (min-max of req/s beside). The floor: an empty ASGI app "
        "deployed beside it in the same cluster (one replica, one CPU).",
        "",
        "| server | c | req/s (min-max) | p50 ms | p99 ms | errors | ÷ direct req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['c']} | {r['rps']:,.0f} ({r['rps_min']:,.0f}-{r['rps_max']:,.0f}) | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | {r['ratio']:.2f} |"
        )
    lines += [
        "",
        "Every request through Ray crosses Ray's proxy (its own uvicorn and router) and an actor call to the "
        "replica before slipstream's app sees it. The floor row is the same path to an app that does nothing: "
        "where slipstream under Ray is close to it, Ray's own per-request cost is the limit, not slipstream's. "
        "What Ray buys is the fleet: replicas spread over nodes, replaced when they die "
        "(tests/test_deploy_ray.py), scaled by Ray's autoscaler.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="8,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds per server and concurrency.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved slices the duration is split into.")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas.")
    parser.add_argument("--quick", action="store_true", help="6 s per server and concurrency, in 3 rounds.")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "engines.md")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 6.0, 3
    with tempfile.TemporaryDirectory(prefix="engines-") as tmp:
        work = Path(tmp)
        _, bundle, body = serving.tiny_mlp(work)
        (work / "keys").write_text(KEY + "\n")
        direct_port, ray_port = serving.free_port(), serving.free_port()
        cmd = [
            sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(bundle),
            "--port", str(direct_port),
            "--api-key-file", str(work / "keys"),
        ]  # fmt: skip
        urls = {
            DIRECT: f"http://127.0.0.1:{direct_port}/v2/models/tiny/infer",
            RAY: f"http://127.0.0.1:{ray_port}/v2/models/tiny/infer",
            FLOOR: f"http://127.0.0.1:{ray_port}{FLOOR_PREFIX}/v2/models/tiny/infer",
        }
        proc = serving.start(cmd, direct_port, "tiny")
        cluster = None
        try:
            started = time.perf_counter()
            cluster = start_ray(bundle, work, args.replicas, ray_port)
            wait_ok(urls[RAY], body)
            wait_ok(urls[FLOOR], body)
            print(f"Ray Serve application up in {time.perf_counter() - started:.1f} s", flush=True)
            wait_ok(urls[DIRECT], body)
            script = wrk_script(work, body)
            for url in urls.values():
                serving.wrk_script(url, script, 8, 2)  # warm-up
            rows = measure(urls, script, args)
        finally:
            serving.stop(proc)
            if cluster is not None:
                stop_ray(cluster)
    write_report(args.out, args, rows)


if __name__ == "__main__":
    main()
