"""Serving settings: typed, frozen and validated before the server starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from slipstream.errors import ConfigError
from slipstream.frozen import Frozen
from slipstream.monitor.config import MonitorConfig
from slipstream.monitor.process.placement import PlacementMode
from slipstream.monitor.store import StoreConfig

VersionPolicy = Literal["latest", "all", "specific"]
NonFinitePolicy = Literal["reject", "allow"]
ComputeMode = Literal["auto", "inline", "thread"]


class BatchSettings(Frozen):
    """Dynamic batching for one model. A batch is flushed as soon as every in-flight request has joined."""

    max_batch_size: int = Field(default=32, ge=1, description="Most rows (samples) in one model call.")
    max_queue_delay_ms: float = Field(
        default=2.0, ge=0, description="Longest a queued request waits for others while more are still arriving."
    )
    max_queue_length: int = Field(
        default=1024, ge=1, description="Most requests waiting per model; beyond it the server answers 503."
    )
    timeout_ms: float = Field(
        default=30_000.0,
        gt=0,
        description="Longest a request may wait for its answer (queue + model call in the worker thread) before "
        "it is answered 504.",
    )
    retry_after_s: float = Field(default=1.0, gt=0, description="The Retry-After a 503 for a full queue carries.")
    compute: ComputeMode = Field(
        default="auto",
        description="Where the model runs: 'inline' on the event loop, 'thread' in a worker thread, or 'auto': "
        "inline for a lone caller when a warm-up call takes under inline_below_ms, else the worker thread.",
    )
    inline_below_ms: float = Field(default=1.0, ge=0, description="The 'auto' threshold for running inline.")


class GuardSettings(Frozen):
    """Authentication, rate limits, size limits and input value checks."""

    api_key_hashes: frozenset[str] = Field(
        default=frozenset(),
        description="Salted HMAC-SHA256 hashes of the accepted API keys (slipstream.serve.guard.hash_key; never "
        "the keys).",
    )
    admin_key_hashes: frozenset[str] = Field(
        default=frozenset(),
        description="Salted HMAC-SHA256 hashes of the keys allowed on the repository endpoints (hash_key).",
    )
    allow_anonymous: bool = Field(
        default=False, description="Serve without API keys on a non-loopback address (explicit opt-out)."
    )
    metrics_open: bool = Field(
        default=False,
        description="Answer GET /metrics without an API key (for a scrape network); otherwise /metrics and "
        "/dashboard need a key whenever the API does.",
    )
    rate_per_s: float | None = Field(
        default=None, gt=0, description="Requests per second each key (or client address) may make; None: no limit."
    )
    burst: int = Field(default=50, ge=1, description="Token-bucket capacity: requests a caller may make at once.")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1, description="Largest request body accepted.")
    max_id_chars: int = Field(
        default=256,
        ge=1,
        description="Longest infer request 'id' accepted (characters); the id is echoed, so a longer one is a 400.",
    )
    non_finite: NonFinitePolicy = Field(default="reject", description="What to do with NaN/Inf in float inputs.")
    cors_origins: tuple[str, ...] = Field(default=(), description="Origins allowed by CORS; empty: CORS off.")


class HttpSettings(Frozen):
    """Limits of the HTTP layer, enforced before the app sees a request (slipstream.serve.http_limits).

    They bound what one connection can make the server buffer or hold: uvicorn's httptools protocol on
    its own buffers an unterminated header without limit and never times a slow client out.
    """

    limits: bool = Field(
        default=True,
        description="Enforce the limits below; False runs uvicorn's plain httptools protocol (unbounded header "
        "buffering, no read timeouts), for comparison only.",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="Most bytes of a request head (request line plus all headers); 431 beyond. Checked after "
        "each socket read, so the most buffered is this plus one read.",
    )
    max_header_count: int = Field(default=100, ge=1, description="Most header lines in one request; 431 beyond.")
    max_request_line_bytes: int = Field(
        default=8 * 1024,
        ge=64,
        description="Longest request target (the path and query of the request line), bytes; 414 beyond.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest time from a new connection, or from the first byte of the next request on a kept-alive "
        "one, until the request's headers are complete; beyond it the connection gets 408 and is closed.",
    )
    body_idle_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest gap between two pieces of a request body while the server is reading it; 408 and "
        "close beyond.",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest time from the end of the headers to the end of the body, however steadily it "
        "trickles in; 408 and close beyond.",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, description="How long an idle kept-alive connection waits for its next request."
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="Most open connections; one more is answered 503 with Retry-After and closed (not reset).",
    )
    retry_after_s: float = Field(
        default=1.0, gt=0, description="The Retry-After of a 503 beyond max_connections or while draining."
    )


class MonitorServing(Frozen):
    """Monitoring from inside the server: the monitor's own configs, embedded as they are, plus how the server
    runs them (the monitor process, its placement and restarts). Off unless ``store`` is given.

    The server's monitor process receives this object as JSON and uses ``config`` and ``store`` unchanged, so
    a field set here (from the CLI, a file or code) is the field the monitor reads: nothing is copied across.
    """

    store: StoreConfig | None = Field(
        default=None,
        description="The prediction log: a SQLite file (WAL) or a postgresql:// database a fleet shares, its "
        "retention and write buffers. Monitoring is on when this is set, off (free: slipstream.monitor's "
        "statistics are never imported) when not.",
    )
    config: MonitorConfig = Field(
        default_factory=MonitorConfig,
        description="What every monitor does: sampling, the drift window, quality, fairness, threats and alert "
        "rules (slipstream.monitor.MonitorConfig).",
    )
    group_parameter: str = Field(
        default="group", min_length=1, description="The request-level parameter naming the caller's group (bias)."
    )
    process_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of the monitor process: it yields the CPU to serving and catches up when there "
        "is room (what it cannot take in time is dropped and counted, never slows a request).",
    )
    placement: PlacementMode = Field(
        default="auto",
        description="'auto': with two or more CPUs, the monitor process gets the last one and the event loop the "
        "others (see slipstream.monitor.process.placement); 'none': the kernel places both.",
    )
    restart_initial_s: float = Field(
        default=0.5, gt=0, description="Wait before restarting a monitor process that died (the first time)."
    )
    restart_max_s: float = Field(
        default=30.0,
        gt=0,
        description="The longest wait between two restarts; a process that ran this long starts the backoff over.",
    )
    restart_factor: float = Field(default=2.0, ge=1, description="Each restart in a row multiplies the wait by this.")
    standby: bool = Field(
        default=True,
        description="Keep a spare monitor process started (imports done, idle, about 150 MB) so that a restart "
        "takes it over at once instead of starting an interpreter under load (seconds).",
    )
    log_max_mb: float | None = Field(
        default=None,
        gt=0,
        description="Cap on the prediction log's size (SQLite max_page_count): past it, writes fail as on a full "
        "disk, and the rows are dropped and counted; None: no cap.",
    )

    @model_validator(mode="after")
    def _cap_needs_sqlite(self) -> MonitorServing:
        if self.log_max_mb is not None and self.store is not None and self.store.url is not None:
            raise ValueError(
                "log_max_mb caps a SQLite log file (max_page_count); a PostgreSQL log is sized by its database "
                "(retention: max_age_s, max_rows). Leave log_max_mb unset with a postgresql:// log."
            )
        return self

    def restart_backoff_s(self, restarts: int) -> float:
        """The wait before restart number ``restarts`` in a row (1, 2, ...)."""
        return float(
            min(self.restart_max_s, self.restart_initial_s * self.restart_factor ** min(max(0, restarts - 1), 64))
        )

    def rules_follow_checks(self) -> MonitorServing:
        """These settings with the accuracy and fairness alert rules at the thresholds of their checks
        (``config.quality``, ``config.fairness``; see MonitorConfig.with_thresholds): what the CLI's one flag
        per decision means."""
        c = self.config
        aligned = c.with_thresholds(
            max_accuracy_drop=c.quality.max_accuracy_drop,
            max_difference=c.fairness.max_difference,
            min_ratio=c.fairness.min_ratio,
        )
        return self.model_copy(update={"config": aligned})

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def required_store(self, who: str) -> StoreConfig:
        """The prediction log's config, for ``who`` (the part that cannot run without one); ConfigError if unset."""
        if self.store is None:
            raise ConfigError(
                f"{who} needs a prediction log; these monitor settings have none (store=None).",
                field="monitor.store",
                hint="Start the server with --monitor-db FILE or postgresql://..., or serve without monitoring.",
            )
        return self.store

    @property
    def db_path(self) -> Path | None:
        """The prediction log's file (``store.path``), None when monitoring is off."""
        return None if self.store is None else self.store.path

    @property
    def log_location(self) -> str | None:
        """Where the prediction log is (a file path or a URL without its password), for messages."""
        return None if self.store is None else self.store.location

    @property
    def ood_reject_above(self) -> float | None:
        """Read-only: ``config.threats.reject_ood_above`` (the request path refuses above it)."""
        return self.config.threats.reject_ood_above


class ReloadSettings(Frozen):
    """Retrying a version that failed to load: a copy still in progress passes once it is complete."""

    retry_initial_s: float = Field(
        default=1.0, gt=0, description="Wait before the first retry of a version whose files failed their check."
    )
    retry_max_s: float = Field(default=60.0, gt=0, description="The longest wait between two retries.")
    retry_factor: float = Field(default=2.0, ge=1, description="Each failed retry multiplies the wait by this.")

    def backoff_s(self, attempts: int) -> float:
        """The wait after ``attempts`` failed attempts (1, 2, ...)."""
        return float(min(self.retry_max_s, self.retry_initial_s * self.retry_factor ** min(max(0, attempts - 1), 64)))


class SigningSettings(Frozen):
    """Refusing bundles that are not signed by a trusted key (OpenSSF model signing; slipstream.artifact.signing)."""

    require_signature: bool = Field(
        default=False,
        description="Serve a version only when its model.sig verifies against the trust anchor below and covers "
        "every file; an unsigned, modified or foreign-signed version is refused at start and at hot reload, "
        "and counted in slipstream_signature_refusals_total.",
    )
    trusted_key: Path | None = Field(
        default=None, description="The PEM public key (ECDSA) the signatures must verify with."
    )
    certificate_chain: tuple[Path, ...] = Field(
        default=(),
        description="Instead of a key: the PEM certificates a signing certificate must chain to (model-signing's "
        "certificate mode).",
    )

    @model_validator(mode="after")
    def _anchor_goes_with_requirement(self) -> SigningSettings:
        anchored = self.trusted_key is not None or bool(self.certificate_chain)
        if self.require_signature and not anchored:
            raise ValueError("require_signature needs trusted_key (a PEM public key) or certificate_chain")
        if anchored and not self.require_signature:
            raise ValueError("trusted_key/certificate_chain take effect only with require_signature: set it too")
        if self.trusted_key is not None and self.certificate_chain:
            raise ValueError("give trusted_key or certificate_chain, not both")
        return self


class ServeSettings(Frozen):
    """Everything `create_app` needs besides the repository path."""

    host: str = Field(default="127.0.0.1", description="The address the server binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="The TCP port.")
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="The TCP port of the gRPC front end (Open Inference Protocol v2, "
        "inference.GRPCInferenceService) on the same host; None or 0: gRPC off.",
    )
    version_policy: VersionPolicy = Field(default="latest", description="Which versions of each model to serve.")
    versions: tuple[str, ...] = Field(default=(), description="The versions to serve under the 'specific' policy.")
    intra_op_threads: int = Field(
        default=1, ge=1, description="onnxruntime threads per model; 1 because the HTTP layer shares the cores."
    )
    streams: int | None = Field(
        default=None,
        ge=1,
        description="OpenVINO bundles: inference streams per model, each a share of the threads, as many "
        "batches in flight (more rows per second under load, each batch slower). None: the build's measured "
        "choice (resolved session inter_op_threads), else 1. onnxruntime bundles run one batch at a time.",
    )
    missing_cpu_features: Literal["warn", "refuse"] = Field(
        default="warn",
        description="A bundle whose recorded engine choice needs CPU features this machine lacks (OpenVINO bf16 "
        "without AMX/AVX512-BF16, int8 without VNNI): load it with a warning, or refuse it.",
    )
    poll_interval_s: float = Field(
        default=0.0, ge=0, description="How often to rescan the repository for new versions; 0: only on /load."
    )
    reload: ReloadSettings = Field(
        default_factory=ReloadSettings,
        description="Retries, with backoff, of a version that failed to load (on every rescan, until it passes "
        "or its directory is replaced).",
    )
    batching: BatchSettings = Field(default_factory=BatchSettings, description="Dynamic batching per model.")
    guard: GuardSettings = Field(default_factory=GuardSettings, description="Safety settings.")
    http: HttpSettings = Field(
        default_factory=HttpSettings, description="HTTP limits: header size and count, read timeouts, connections."
    )
    monitor: MonitorServing = Field(
        default_factory=MonitorServing, description="Monitoring (the monitor's own config, embedded); off by default."
    )
    signing: SigningSettings = Field(
        default_factory=SigningSettings, description="Signature checks of every version before it serves."
    )
    access_log: bool = Field(default=True, description="Write one JSON line per request to 'slipstream.access'.")
    drain_timeout_s: float = Field(default=30.0, gt=0, description="How long SIGTERM waits for in-flight requests.")
    gc_freeze: bool = Field(
        default=True,
        description="After each model version loads, move every live object out of the garbage collector's "
        "sight (gc.freeze): full collections then walk only per-request garbage (p99 ~30 → ~10 ms on the digits "
        "MLP at 64 connections). Process-wide, so an embedding application may turn it off.",
    )
