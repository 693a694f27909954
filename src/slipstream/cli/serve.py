"""`slipstream serve`: a bundle or a model repository over the Open Inference Protocol v2 (REST, gRPC), with
the guard, batching and, with --monitor-db, monitoring; its options map onto ServeSettings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slipstream.cli.output import reporting


def serve_command(
    path: Annotated[Path, typer.Argument(help="A bundle, or a repository laid out as <model>/<version>/.")],
    host: Annotated[str, typer.Option(help="Address to bind; off loopback, API keys are required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (OIP v2 inference service); off if unset.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="API keys, one per line (or $SLIPSTREAM_API_KEYS).")] = None,
    admin_key_file: Annotated[
        Path | None, typer.Option(help="Keys for /v2/repository/* (or $SLIPSTREAM_ADMIN_KEYS).")
    ] = None,
    allow_anonymous: Annotated[bool, typer.Option(help="Serve off loopback without API keys.")] = False,
    open_metrics: Annotated[
        bool, typer.Option(help="Answer /metrics without a key (a scrape network); by default it needs one.")
    ] = False,
    version_policy: Annotated[str, typer.Option(help="latest, all or specific.")] = "latest",
    model_version: Annotated[
        list[str] | None, typer.Option("--model-version", help="A version for --version-policy specific; repeatable.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most rows per model call.")] = 32,
    max_queue_delay_ms: Annotated[float, typer.Option(help="Longest wait for a batch to fill.")] = 2.0,
    max_queue_length: Annotated[int, typer.Option(help="Queued requests per model before 503.")] = 1024,
    timeout_ms: Annotated[float, typer.Option(help="Timeout per request, queue + model (504).")] = 30_000.0,
    compute: Annotated[str, typer.Option(help="auto, inline (on the event loop) or thread.")] = "auto",
    rate_per_s: Annotated[float | None, typer.Option(help="Requests/s per API key (429 beyond).")] = None,
    burst: Annotated[int, typer.Option(help="Token-bucket burst per key.")] = 50,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413 beyond).")] = 16 * 1024 * 1024,
    max_id_chars: Annotated[int, typer.Option(min=1, help="Longest request 'id' accepted (400 beyond).")] = 256,
    non_finite: Annotated[str, typer.Option(help="reject or allow NaN/Inf inputs.")] = "reject",
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="An origin CORS allows; repeatable. Off by default.")
    ] = None,
    http_limits: Annotated[
        bool, typer.Option(help="Enforce the HTTP limits below (off: plain uvicorn httptools, for comparison).")
    ] = True,
    max_header_bytes: Annotated[int, typer.Option(help="Most bytes of a request head (431 beyond).")] = 32 * 1024,
    max_header_count: Annotated[int, typer.Option(help="Most header lines per request (431 beyond).")] = 100,
    max_request_line_bytes: Annotated[int, typer.Option(help="Longest request target (414 beyond).")] = 8 * 1024,
    header_timeout: Annotated[float, typer.Option(help="Seconds to send a request head (408 beyond).")] = 10.0,
    body_idle_timeout: Annotated[float, typer.Option(help="Most seconds between body pieces (408).")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Most seconds for a whole request body (408).")] = 60.0,
    keep_alive_timeout: Annotated[float, typer.Option(help="Seconds an idle connection is kept.")] = 5.0,
    max_connections: Annotated[int, typer.Option(help="Open connections before 503 + Retry-After.")] = 1024,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="onnxruntime intra-op threads per model (default: the build's tuned count, else 1)."),
    ] = None,
    streams: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="OpenVINO bundles: inference streams per model, as many batches in flight (more rows/s under "
            "load, each batch slower); default: the build's measured choice, else 1.",
        ),
    ] = None,
    poll_interval: Annotated[float, typer.Option(help="Seconds between repository rescans; 0: off.")] = 0.0,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Serving processes on the port (SO_REUSEPORT), supervised by a parent, with one monitor "
            "process; 1: one process, no parent.",
        ),
    ] = 1,
    access_log: Annotated[bool, typer.Option(help="JSON access log lines on stderr.")] = True,
    gc_freeze: Annotated[
        bool, typer.Option(help="gc.freeze() after each model load: steadier p99 (process-wide).")
    ] = True,
    missing_cpu_features: Annotated[
        str, typer.Option(help="warn or refuse: a bundle built for CPU features this machine lacks (bf16, VNNI).")
    ] = "warn",
    monitor_db: Annotated[
        str | None,
        typer.Option(
            help="Monitor into this prediction log: a SQLite file, or postgresql://user@host/db shared by a "
            "fleet (password from PGPASSWORD or PGPASSFILE, never here). Off when not given."
        ),
    ] = None,
    monitor_db_degraded_start: Annotated[
        bool,
        typer.Option(
            help="With a postgresql:// log: start even when the database cannot be reached (logged); records "
            "wait in the bounded buffer until it answers."
        ),
    ] = False,
    monitor_sample_rate: Annotated[float, typer.Option(help="Share of requests logged (0..1).")] = 1.0,
    monitor_raw_inputs: Annotated[bool, typer.Option(help="Log raw inputs too, not only summaries.")] = False,
    ood_reject: Annotated[
        float | None, typer.Option(help="Refuse requests whose out-of-distribution score exceeds this.")
    ] = None,
    group_parameter: Annotated[str, typer.Option(help="Request parameter naming the caller's group.")] = "group",
    accuracy_drop_alert: Annotated[float, typer.Option(help="Alert when accuracy drops by more.")] = 0.05,
    fairness_max_difference: Annotated[float, typer.Option(help="Alert above this parity/odds gap.")] = 0.1,
    fairness_min_ratio: Annotated[float, typer.Option(help="Alert below this parity ratio.")] = 0.8,
    fairness_positive_label: Annotated[
        float, typer.Option(help="The predicted class (or label) that counts as selected in the bias report.")
    ] = 1.0,
    fairness_confidence: Annotated[
        float,
        typer.Option(
            help="Family confidence of the fairness intervals; a bias alert needs its whole interval past "
            "the threshold."
        ),
    ] = 0.99,
    webhook: Annotated[str | None, typer.Option(help="POST alert transitions to this URL.")] = None,
    alert_keep_firing: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds a firing alert stays firing after its condition clears: a one-window dip is not a "
            "resolve and a new alert. 0: resolve at once.",
        ),
    ] = 0.0,
    monitor_retention_days: Annotated[float, typer.Option(help="Delete logged predictions older than this.")] = 7.0,
    monitor_max_rows: Annotated[int, typer.Option(help="Keep at most this many logged predictions.")] = 1_000_000,
    monitor_interval: Annotated[float, typer.Option(help="Seconds between monitor evaluations.")] = 10.0,
    monitor_nice: Annotated[
        int, typer.Option(help="Niceness of the monitor process (0-19): it yields the CPU to serving.")
    ] = 10,
    monitor_placement: Annotated[
        str,
        typer.Option(
            help="auto: the monitor process gets a CPU of its own and the event loop the others; none: "
            "the kernel places both."
        ),
    ] = "auto",
    monitor_standby: Annotated[
        bool, typer.Option(help="Keep a spare monitor process (idle, ~150 MB) for a restart in a second.")
    ] = True,
    monitor_restart_max: Annotated[
        float, typer.Option(help="Longest wait (s) before restarting a monitor process that keeps dying.")
    ] = 30.0,
    monitor_log_max_mb: Annotated[
        float | None, typer.Option(help="Cap on the prediction log's size; past it rows are dropped and counted.")
    ] = None,
    require_signature: Annotated[
        bool,
        typer.Option(help="Serve only versions whose model.sig verifies with --trusted-key and covers every file."),
    ] = False,
    trusted_key: Annotated[
        Path | None, typer.Option(help="The PEM public key signatures must verify with (--require-signature).")
    ] = None,
    trusted_certificate: Annotated[
        list[Path] | None,
        typer.Option(help="Instead of --trusted-key: a CA certificate signing certificates must chain to."),
    ] = None,
) -> None:
    """Serve a bundle or a model repository over the Open Inference Protocol v2 (REST).

    With --monitor-db, the server also monitors (latency, drift, accuracy from feedback, bias, threats):
    POST /v2/models/{m}/feedback, GET /v2/models/{m}/monitoring, monitor series in /metrics, and /dashboard.
    """
    import os

    from slipstream.serve.server import serve as do_serve
    from slipstream.serve.server import settings_from_options

    options = {
        "host": host, "port": port, "grpc_port": grpc_port,
        "api_key_file": api_key_file, "admin_key_file": admin_key_file,
        "allow_anonymous": allow_anonymous, "metrics_open": open_metrics,
        "version_policy": version_policy, "versions": tuple(model_version or ()),
        "max_batch_size": max_batch_size, "max_queue_delay_ms": max_queue_delay_ms,
        "max_queue_length": max_queue_length, "timeout_ms": timeout_ms, "compute": compute,
        "rate_per_s": rate_per_s, "burst": burst,
        "max_body_bytes": max_body_bytes, "max_id_chars": max_id_chars, "non_finite": non_finite,
        "cors_origins": tuple(cors_origin or ()),
        "intra_op_threads": threads, "streams": streams, "poll_interval_s": poll_interval,
        "access_log": access_log, "gc_freeze": gc_freeze,
        "missing_cpu_features": missing_cpu_features,
        "http_limits": http_limits, "http_max_header_bytes": max_header_bytes,
        "http_max_header_count": max_header_count, "http_max_request_line_bytes": max_request_line_bytes,
        "http_header_timeout_s": header_timeout, "http_body_idle_timeout_s": body_idle_timeout,
        "http_body_timeout_s": body_timeout, "http_keep_alive_timeout_s": keep_alive_timeout,
        "http_max_connections": max_connections,
        # Shaped like ServeSettings.monitor (MonitorServing): the monitor's own configs, filled in place.
        "monitor": {
            "store": None if monitor_db is None else {
                "path": monitor_db, "max_age_s": monitor_retention_days * 86400, "max_rows": monitor_max_rows,
                "degraded_start": monitor_db_degraded_start,
            },
            "config": {
                "sample_rate": monitor_sample_rate, "log_raw_inputs": monitor_raw_inputs,
                "evaluate_interval_s": monitor_interval,
                "quality": {"max_accuracy_drop": accuracy_drop_alert},
                "fairness": {"max_difference": fairness_max_difference, "min_ratio": fairness_min_ratio,
                             "positive_label": fairness_positive_label, "confidence": fairness_confidence},
                "threats": {"reject_ood_above": ood_reject},
                "alerts": {"webhook_url": webhook, "keep_firing_for_s": alert_keep_firing},
            },
            "group_parameter": group_parameter, "process_nice": monitor_nice, "placement": monitor_placement,
            "standby": monitor_standby, "restart_max_s": monitor_restart_max, "log_max_mb": monitor_log_max_mb,
        },
        "signing": {"require_signature": require_signature, "trusted_key": trusted_key,
                    "certificate_chain": tuple(trusted_certificate or ())},
    }  # fmt: skip
    if threads is None:  # unset: each bundle's tuned resolved["session"] applies (serve/repository.py)
        options.pop("intra_op_threads")
    with reporting(as_json=False):
        do_serve(path, settings_from_options(options, os.environ), workers)
