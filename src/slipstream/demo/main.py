"""`slipstream demo`: the whole promise, end to end, on this machine.

Train a small CNN on scikit-learn's digits, convert it with a parity proof, build the fastest model
within one point of accuracy (pruning, fine-tuning, int8...), serve it on loopback with an API key and
a rate limit, send normal, drifted, biased, malformed, unauthenticated and over-the-limit traffic, show
what the monitor concluded after each phase, and shut down cleanly. ``fast`` trims the build and the burst
(for the test suite); ``seed`` drives every random choice of the traffic. :func:`run_demo` prints for
people and returns a :class:`~slipstream.demo.result.DemoResult` for code.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.rule import Rule

from slipstream.artifact.bundle import Bundle
from slipstream.build.recipe import Budget, Candidate, DataConfig, Recipe
from slipstream.cli.build import render_record, run_with_progress
from slipstream.cli.output import console
from slipstream.demo.report import phase_table, render_monitoring
from slipstream.demo.result import DemoResult
from slipstream.demo.session import POSITIVE_LABEL, serve_and_watch
from slipstream.importers import convert

ENTRY = "slipstream.demo.digits:build"
ROWS_PER_PHASE = 2000  # enough for the biased phase's parity-ratio interval to clear 0.8 (see session.py)


def _heading(text: str) -> None:
    console.print(Rule(f"[bold]{text}[/]"))


def _say(text: str) -> None:
    console.print(escape(text), highlight=False)


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


def run_demo(workdir: Path, *, fast: bool = False, seed: int = 0) -> DemoResult:
    import torch

    from slipstream.demo.digits import build, split

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
    tamper_refused = _show_tamper_check(bundle.path, work / "tampered")

    _heading("3 · build: the fastest model within 1 point of accuracy, at batch 256")
    result = run_with_progress(_recipe(work, fast), quiet=False)
    render_record(result.record)
    console.print(f"report: {result.output / 'report.html'}", highlight=False)

    _heading("4 · serve the winner on loopback (API key, rate limit, monitoring)")
    console.print(
        "the winner carries profile.json: the held-out digits' statistics that monitoring compares with.\n"
        f"Every phase sends {ROWS_PER_PHASE} held-out digits drawn at random (seed {seed}), 16 per request, each "
        "request in group a or b (b: 30 %, drawn per request);\n"
        f"the monitor's windows hold {ROWS_PER_PHASE} rows, so each evaluation judges one phase. Fairness watches "
        f"the digit {POSITIVE_LABEL} (fairness_positive_label): the biased phase mirrors group b's "
        f"{POSITIVE_LABEL}s, which the model then misreads.",
        highlight=False,
    )

    _heading("5 · traffic: normal, drifted, biased, then attacks")
    traffic = serve_and_watch(
        result.winner.path,
        work,
        x_test,
        y_test,
        seed=seed,
        rows_per_phase=ROWS_PER_PHASE,
        burst_requests=300 if fast else 400,
        say=_say,
    )
    console.print(phase_table(traffic.phases))

    _heading("6 · what the server saw, and what the monitor made of it")
    for line in traffic.metrics_lines:
        console.print("  " + escape(line), highlight=False)
    normal, drifted, biased = (traffic.phase(k) for k in ("normal", "drifted", "biased"))
    console.print(
        f"server errors (5xx): {traffic.server_errors}; accuracy on normal traffic {normal.accuracy or 0:.3f}, "
        f"on drifted traffic {drifted.accuracy or 0:.3f}, on biased traffic {biased.accuracy or 0:.3f} "
        f"({biased.perturbed_rows} digits mirrored); {traffic.labels_sent} ground-truth labels sent back",
        highlight=False,
    )
    render_monitoring(traffic)

    _heading("7 · shut down")
    seconds = time.perf_counter() - started
    console.print(f"drained and stopped; the whole demo took {seconds:.0f} s", highlight=False)
    console.print(
        "Next, on your own model:\n"
        "  slipstream convert my_model.py:build -o my-bundle --input-shape batch,3,224,224\n"
        "  slipstream build my-recipe.yaml          # start from examples/digits-cnn.yaml\n"
        "  slipstream serve build-output/winner --api-key-file keys.txt",
        highlight=False,
    )
    return DemoResult(
        workdir=work,
        fast=fast,
        heldout_accuracy=accuracy,
        tamper_refused=tamper_refused,
        winner=result.winner.path,
        winner_name=result.record.selection.winner if result.record.selection else "baseline",
        traffic=traffic,
        seconds=seconds,
    )


def _show_tamper_check(bundle_dir: Path, copy: Path) -> bool:
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
        return True
    else:
        raise RuntimeError("a tampered bundle loaded without an integrity error")  # the point of this stage
    finally:
        shutil.rmtree(copy, ignore_errors=True)
