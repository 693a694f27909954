"""Rich renderings of summaries and reports."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from slipstream.artifact.manifest import ParityRecord
from slipstream.artifact.summary import BundleSummary
from slipstream.artifact.tensor import TensorSpec
from slipstream.cli.output import console
from slipstream.evaluate.bench import BenchReport


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _io_table(title: str, specs: tuple[TensorSpec, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("name")
    table.add_column("dtype")
    table.add_column("shape")
    for s in specs:
        table.add_row(escape(s.name), s.dtype, escape(s.shape_text()))
    return table


def _inputs_used(p: ParityRecord) -> str:
    sets = "; ".join(f"batch={c.batch}" + "".join(f", {k}={v}" for k, v in sorted(c.dims.items())) for c in p.cases)
    return f"{len(p.cases)} {p.data} input sets ({sets})"


def render_parity(p: ParityRecord | None) -> None:
    """One line for the proof (largest errors, the inputs it ran on), then a warning line per weakness."""
    if p is None:
        console.print("parity: not applicable (the source is ONNX; nothing was converted)", highlight=False)
        return
    if p.status == "skipped":
        console.print(f"[yellow]parity: skipped[/] ({escape(p.reason or '')})", highlight=False)
        return
    compared = [o for c in p.cases for o in c.outputs]
    worst_abs = max((o.max_abs_error for o in compared), default=0.0)
    worst_rel = max((o.max_rel_error for o in compared), default=0.0)
    verdict = "[green]parity: passed[/]" if p.informative else "[yellow]parity: passed, not informative[/]"
    console.print(
        f"{verdict} against {escape(p.reference)} on {escape(_inputs_used(p))}; "
        f"max abs error {worst_abs:.3g}, max rel error {worst_rel:.3g}",
        highlight=False,
    )
    for text in p.warnings:
        console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)


def render_summary(s: BundleSummary) -> None:
    console.print(f"[bold]{escape(s.name)}[/] v{escape(s.version)}  ({escape(s.path)})", highlight=False)
    src = s.source
    console.print(f"source: {src.framework} {escape(src.path or '')}", highlight=False)
    console.print(
        f"{s.node_count} nodes · {s.parameter_count:,} parameters · weights {_human_bytes(s.weights_bytes)}"
        f" · bundle {_human_bytes(s.bundle_bytes)} · opsets {escape(str(s.opsets))}",
        highlight=False,
    )
    render_parity(s.parity)
    console.print(_io_table("inputs", s.inputs))
    console.print(_io_table("outputs", s.outputs))
    ops = Table(title="operators", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in s.op_histogram.items():
        ops.add_row(op, str(count))
    console.print(ops)
    if s.largest_initializers:
        inits = Table(title="largest weights", title_justify="left")
        for col in ("name", "dtype", "shape", "size"):
            inits.add_column(col, justify="right" if col == "size" else "left")
        for i in s.largest_initializers:
            inits.add_row(escape(i.name), i.dtype, escape(str(list(i.shape))), _human_bytes(i.size_bytes))
        console.print(inits)
    lineage = Table(title="lineage", title_justify="left")
    for col in ("step", "duration", "output sha256", "at"):
        lineage.add_column(col)
    for e in s.lineage:
        lineage.add_row(e.step, f"{e.duration_s:.3f} s", e.output_sha256[:12], e.at.isoformat(timespec="seconds"))
    console.print(lineage)
    if s.metrics:
        console.print("metrics:", s.metrics)
    console.print(
        f"signature: {escape(s.signature or 'none (slipstream sign BUNDLE --key private.pem)')}", highlight=False
    )
    console.print(f"build SBOM: {escape(s.sbom or 'none (written by slipstream build)')}", highlight=False)
    if s.image_sbom is not None:
        console.print(f"image SBOM: {escape(s.image_sbom)}", highlight=False)


def render_bench(r: BenchReport) -> None:
    eng = r.engine
    console.print(
        f"[bold]{escape(r.model)}[/] v{escape(r.version)} on {eng.target} · providers {', '.join(eng.providers)} · "
        f"threads {eng.intra_op_threads} · session load {r.session_load_s * 1000:.1f} ms · "
        f"peak RSS {r.peak_rss_mb:.0f} MiB",
        highlight=False,
    )
    if eng.fallback:
        console.print(f"[yellow]fallback:[/] {escape(eng.fallback)}", highlight=False)
    table = Table(title="latency", title_justify="left")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "stdev ms", "samples/s", "GFLOP/s", "runs", "settled"):
        table.add_column(col, justify="right")
    for b in r.results:
        table.add_row(
            str(b.batch),
            f"{b.p50_ms:.3f}",
            f"{b.p90_ms:.3f}",
            f"{b.p99_ms:.3f}",
            f"{b.stdev_ms:.3f}",
            f"{b.throughput_sps:,.0f}",
            "-" if b.achieved_gflops is None else f"{b.achieved_gflops:.2f}",
            str(b.runs),
            "yes" if b.settled else "no",
        )
    console.print(table)
    if r.comparisons:
        src = Table(title=f"against {r.source_framework} on the same inputs, timed side by side", title_justify="left")
        for col in ("batch", "threads", "source p50 / p90 ms", "bundle p50 / p90 ms", "n", "speed-up"):
            src.add_column(col, justify="right")
        for mine, c in zip(r.results, r.comparisons, strict=True):
            ref, sub = c.reference_timing, c.subject_timing
            src.add_row(
                str(mine.batch),
                str(c.threads),
                f"{ref.p50_ms:.3f} / {ref.p90_ms:.3f}",
                f"{sub.p50_ms:.3f} / {sub.p90_ms:.3f}",
                str(sub.n),
                escape(c.ratio_text()),
            )
        console.print(src)
    best = max((b.achieved_gflops or 0.0 for b in r.results), default=0.0)
    console.print(
        f"best {best:.2f} GFLOP/s = {100 * best / r.peak.gflops:.1f} % of an estimated {r.peak.gflops:.0f} GFLOP/s "
        f"fp32 peak ({escape(r.peak.method)}); counted ops: {escape(str(r.counted_ops))}",
        highlight=False,
    )
