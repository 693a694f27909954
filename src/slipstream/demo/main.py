"""`slipstream demo`: the whole promise, end to end, on this machine.

Train a small CNN on scikit-learn's digits, convert it with a parity proof, build the fastest model
within one point of accuracy (pruning, fine-tuning, int8...), serve it on loopback with an API key and
a rate limit, send normal, drifted, malformed, unauthenticated and over-the-limit traffic, show what the
server saw, and shut down cleanly. ``fast`` trims the build and the traffic (for the test suite).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from slipstream.artifact.bundle import Bundle
from slipstream.build.recipe import Budget, Candidate, DataConfig, Recipe
from slipstream.cli.build import render_record, run_with_progress
from slipstream.cli.output import console
from slipstream.demo.report import render_monitoring
from slipstream.demo.traffic import (
    Phase,
    send_burst,
    send_feedback,
    send_labelled,
    send_malformed,
    send_unauthenticated,
)
from slipstream.importers import convert

ENTRY = "slipstream.demo.digits:build"
API_KEY = "demo-key"
SHIFTED_KEY = "demo-shifted-key"  # another client, so each stays within its own rate limit
BURST_KEY = "demo-burst-key"


def _heading(text: str) -> None:
    console.print(Rule(f"[bold]{text}[/]"))


def _recipe(work: Path, fast: bool) -> Recipe:
    fast_ladder = (
        Candidate(name="int8-static", passes=({"quantize.static": {"data": str(work / "eval.npz")}},)),
        Candidate(
            name="pruned-50",
            passes=(
                {"prune.structured": {"amount": 0.5}},
                {"train.finetune": {"epochs": 3, "lr": 0.002}},
                "export",
            ),
        ),
    )
    return Recipe(
        name="digits",
        model=ENTRY,
        input_shape="batch,1,8,8",
        data=DataConfig(eval=str(work / "eval.npz"), train=str(work / "train.npz")),
        metric="accuracy",
        budget=Budget(max_accuracy_drop=0.01),
        batch_size=256,
        candidates=fast_ladder if fast else "auto",
        output=str(work / "build"),
        bench_time_s=0.3 if fast else 2.0,
    )


def _phase_table(phases: list[Phase]) -> Table:
    table = Table(title="traffic")
    for col in ("kind", "requests", "answers", "accuracy"):
        table.add_column(col, justify="right" if col in ("requests", "accuracy") else "left")
    for p in phases:
        answers = ", ".join(f"{code}×{n}" for code, n in sorted(p.statuses.items()))
        acc = "-" if p.accuracy is None else f"{p.accuracy:.3f}"
        table.add_row(escape(p.name), str(p.sent), answers, acc)
    return table


def _metric_lines(text: str, prefixes: tuple[str, ...]) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefixes) and not line.startswith("#")]


def run_demo(workdir: Path, *, fast: bool = False) -> None:
    import httpx
    import torch

    from slipstream.demo.digits import build, split
    from slipstream.serve.background import ServerThread
    from slipstream.serve.guard import hash_key
    from slipstream.serve.settings import GuardSettings, MonitorSettings, ServeSettings

    started = time.perf_counter()
    work = workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    _heading("1 · train a small CNN on scikit-learn's digits")
    t0 = time.perf_counter()
    model = build()
    x_train, y_train, x_test, y_test = split()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    np.savez(work / "train.npz", pixels=x_train, labels=y_train)
    np.savez(work / "eval.npz", pixels=x_test, labels=y_test)
    console.print(
        f"trained (or loaded from the cache) in {time.perf_counter() - t0:.1f} s; held-out accuracy {accuracy:.4f} "
        f"on {len(y_test)} digits",
        highlight=False,
    )

    _heading("2 · convert it to ONNX, with a parity proof")
    bundle = convert(ENTRY, work / "converted", input_shapes=["batch,1,8,8"], name="digits", overwrite=True)
    parity = bundle.manifest.parity
    if parity is not None and parity.status == "passed":
        worst = max(o.max_abs_error for c in parity.cases for o in c.outputs)
        cases = ", ".join(f"batch {c.batch}" for c in parity.cases)
        console.print(
            f"[green]✓[/] matches {escape(parity.reference)} on {cases}: largest abs error {worst:.2e}",
            highlight=False,
        )
    console.print(f"bundle: {bundle.path} (sha256 of every file recorded; load verifies them)", highlight=False)
    _show_tamper_check(bundle.path, work / "tampered")

    _heading("3 · build: the fastest model within 1 point of accuracy, at batch 256")
    result = run_with_progress(_recipe(work, fast), quiet=False)
    render_record(result.record)
    console.print(f"report: {result.output / 'report.html'}", highlight=False)

    _heading("4 · serve the winner on loopback (API key, rate limit, monitoring)")
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(result.winner.path, repo / "digits" / "1")
    console.print("the winner carries profile.json: the held-out digits' statistics that monitoring compares with")
    db = work / "monitor.db"
    db.unlink(missing_ok=True)
    settings = ServeSettings(
        port=0,
        access_log=False,
        guard=GuardSettings(
            api_key_hashes=frozenset(hash_key(k) for k in (API_KEY, SHIFTED_KEY, BURST_KEY)), rate_per_s=20.0, burst=200
        ),
        monitor=MonitorSettings(db_path=db, evaluate_interval_s=3600.0),
    )
    with ServerThread(repo, settings) as server:
        url = f"{server.url}/v2/models/digits/infer"
        console.print(f"serving {result.winner.manifest.name} at {server.url} (Open Inference Protocol v2)")

        _heading("5 · traffic: normal, drifted, malformed, unauthenticated, over the rate limit")
        rows = 16 if fast else 8
        live_x, live_y = (x_train[:640], y_train[:640]) if fast else (x_train, y_train)
        monitoring = f"{server.url}/v2/models/digits/monitoring?evaluate=true"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(timeout=60.0) as client:
            normal = Phase("normal digits")
            send_labelled(client, url, normal, live_x, live_y, key=API_KEY, rows=rows, group_of=_group)
            before = client.get(monitoring, headers=auth).json()
            drifted = Phase("drifted (inverted pixels)")
            send_labelled(client, url, drifted, 1.0 - live_x, live_y, key=SHIFTED_KEY, rows=rows, group_of=_group)
            labels = send_feedback(client, f"{server.url}/v2/models/digits/feedback", API_KEY, [normal, drifted])
            after = client.get(monitoring, headers=auth).json()
            phases = [
                normal,
                drifted,
                send_malformed(client, url, API_KEY),
                send_unauthenticated(client, url, x_test),
                send_burst(client, url, x_test, BURST_KEY, 300 if fast else 400),
            ]
            console.print(_phase_table(phases))
            final = client.get(monitoring, headers=auth).json()

            _heading("6 · what the server saw, and what the monitor made of it")
            metrics = client.get(f"{server.url}/metrics").text
            for line in _metric_lines(metrics, ("slipstream_requests_total", "slipstream_rejections_total")):
                console.print("  " + escape(line), highlight=False)
            failures = sum(n for p in phases for code, n in p.statuses.items() if code >= 500)
            console.print(
                f"server errors (5xx): {failures}; accuracy on normal traffic {normal.accuracy or 0:.3f}, "
                f"on drifted traffic {drifted.accuracy or 0:.3f}; {labels} ground-truth labels sent back",
                highlight=False,
            )
            render_monitoring(before, after, final)

    _heading("7 · shut down")
    console.print(f"drained and stopped; the whole demo took {time.perf_counter() - started:.0f} s", highlight=False)
    console.print(
        "Next, on your own model:\n"
        "  slipstream convert my_model.py:build -o my-bundle --input-shape batch,3,224,224\n"
        "  slipstream build my-recipe.yaml          # start from examples/digits-cnn.yaml\n"
        "  slipstream serve build-output/winner --api-key-file keys.txt",
        highlight=False,
    )


def _show_tamper_check(bundle_dir: Path, copy: Path) -> None:
    """A copy with one flipped byte must be refused: that is what 'verified' means."""
    from slipstream.artifact.bundle import MODEL_FILE
    from slipstream.errors import IntegrityError

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle_dir, copy)
    data = bytearray((copy / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / MODEL_FILE).write_bytes(bytes(data))
    try:
        Bundle.load(copy)
    except IntegrityError as exc:
        console.print(f"[green]✓[/] a copy with one flipped byte is refused: {escape(exc.message)}", highlight=False)
    else:
        raise RuntimeError("a tampered bundle loaded without an integrity error")  # the point of this stage
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _group(i: int) -> str:
    return "a" if i % 2 == 0 else "b"
