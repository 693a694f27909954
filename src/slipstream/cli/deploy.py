"""`slipstream export`: hand a bundle or a repository to Ray Serve, KServe, Triton, a container or the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from slipstream.cli.output import console, err_console, print_json, reporting
from slipstream.errors import ConfigError, validation_problems


def export_command(
    source: Annotated[Path, typer.Argument(help="A bundle, or a model repository laid out as <model>/<version>/.")],
    to: Annotated[str, typer.Option("--to", help="ray, kserve, triton, container or edge.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write (renamed into place at the end).")],
    replicas: Annotated[int, typer.Option(help="Fixed number of replicas.")] = 1,
    min_replicas: Annotated[int | None, typer.Option(help="Autoscaling lower bound (with --max-replicas).")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscaling upper bound (with --min-replicas).")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPUs per replica (default: the build's tuned threads).")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="MiB per replica (default: measured footprint).")] = None,
    image: Annotated[str, typer.Option(help="Image that runs slipstream serve.")] = "slipstream-serve:latest",
    base_image: Annotated[str, typer.Option(help="Base image of the Dockerfile.")] = "python:3.11-slim",
    storage_uri: Annotated[str | None, typer.Option(help="Where KServe fetches the bundle (s3://, pvc://...).")] = None,
    monitor_db: Annotated[
        str | None, typer.Option(help="Ray: postgresql:// URL every replica logs to (one fleet), or a file path.")
    ] = None,
    architecture: Annotated[str | None, typer.Option(help="x86_64 or aarch64 (default: this machine's).")] = None,
    accelerator: Annotated[str, typer.Option(help="Triton accelerator: auto, none, tensorrt, openvino.")] = "auto",
    instances: Annotated[int, typer.Option(help="Model instances per replica (Triton).")] = 1,
    batching: Annotated[
        bool | None, typer.Option("--batching/--no-batching", help="Demand or turn off server-side batching.")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Largest server-formed batch.")] = None,
    max_queue_delay_us: Annotated[int | None, typer.Option(help="Longest wait for a batch to fill, µs.")] = None,
    port: Annotated[int, typer.Option(help="HTTP port of the serving container.")] = 8000,
    operator_set: Annotated[str | None, typer.Option(help="Edge: a named minimal operator set (mlp, cnn...).")] = None,
    parity_data: Annotated[Path | None, typer.Option(help="Edge: real inputs (.npz) for the parity check.")] = None,
    wheel: Annotated[Path | None, typer.Option(help="Container: slipstream's wheel (default: built here).")] = None,
    trusted_key: Annotated[
        Path | None,
        typer.Option(help="Container/Ray: the public key the bundles are signed with; the server then requires it."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Write what an existing serving engine needs to run a verified bundle; nothing is written if it is refused."""
    from slipstream.deploy import DeployOptions, export

    raw: dict[str, Any] = {
        "replicas": replicas,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "cpus_per_replica": cpus,
        "memory_per_replica_mb": memory_mb,
        "image": image,
        "base_image": base_image,
        "storage_uri": storage_uri,
        "monitor_db": monitor_db,
        "architecture": architecture,
        "accelerator": accelerator,
        "instances_per_replica": instances,
        "batching": batching,
        "max_batch_size": max_batch_size,
        "max_queue_delay_us": max_queue_delay_us,
        "port": port,
        "operator_set": operator_set,
        "parity_data": parity_data,
        "wheel": wheel,
        "trusted_key": trusted_key,
        "overwrite": overwrite,
    }

    def progress(message: str) -> None:
        if not as_json:
            err_console.print(f"[dim]·[/] {message}", highlight=False)

    with reporting(as_json=as_json):
        try:
            options = DeployOptions.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                f"Invalid export options: {validation_problems(exc)}.", hint="See `slipstream export --help`."
            ) from None
        result = export(source, to, output, options, progress=progress)
    if as_json:
        print_json(result)
        return
    console.print(f"exported {', '.join(result.models)} for {result.target} to {result.out}", highlight=False)
    for name in result.files:
        console.print(f"  {name}", highlight=False)
