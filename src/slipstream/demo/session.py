"""The serving half of the demo: serve a bundle on loopback, send each phase of traffic, and ask the monitor
what it concluded right after each one.

Why the windows equal a phase: drift is computed over the newest ``window_rows`` rows the monitor saw, and
accuracy and fairness over the newest ``quality_window_rows`` logged rows. Each labelled phase sends exactly
that many rows and then its labels, so the evaluation that follows it judges that phase alone, not a blend
of it and the one before. The attacks (malformed, unauthenticated, a burst of one digit) come last.

The order is chosen so that no verdict is an echo of an earlier phase: an alert that has fired stays firing
until its own metric comes back (a fairness alert until the point estimate, not just the interval, is on
the good side), so the biased phase comes after the drifted one, not before.

Why the class of interest is 3 and group b a 30 % minority: the biased phase must be decided at the demo's
window (the parity ratio's simultaneous interval wholly below 0.8) while the accuracy it costs (group b's
mirrored 3s, about 2 % of rows) stays clear of the 5-point accuracy-drop limit, so that the biased phase
raises the bias alerts and nothing else. Simulated over 100 seeds at 2,000 rows: decided in 100, accuracy
drop at most 0.035; on the same windows without the mirror, the fairness report flagged none.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slipstream.demo.result import FiringAlert, MonitorView, TrafficResult, ViewName
from slipstream.demo.traffic import (
    Phase,
    Sampler,
    inverted,
    mirrored_for_minority,
    send_burst,
    send_feedback,
    send_labelled,
    send_malformed,
    send_unauthenticated,
)

MODEL = "digits"
POSITIVE_LABEL = 3  # the class of interest: a prediction of 3 counts as "selected" in the fairness report
ROWS_PER_REQUEST = 16
KEYS: dict[str, str] = {  # one key per client, so each stays within its own rate limit
    "normal": "demo-normal-key-0001",
    "drifted": "demo-shifted-key-0001",
    "biased": "demo-biased-key-0001",
    "burst": "demo-burst-key-00001",
    "ops": "demo-ops-key-000001",  # labels and monitoring
}
Labelled = Literal["normal", "drifted", "biased"]
PHASE_NAMES: dict[Labelled, str] = {
    "normal": "normal digits",
    "drifted": "drifted (inverted pixels)",
    "biased": f"biased (group b's {POSITIVE_LABEL}s mirrored)",
}


def _quiet(_: str) -> None:
    return None


class DemoServer:
    """A real server on loopback serving one bundle as versions 1..n of :data:`MODEL`, each version with its
    own monitor (windows, alerts) and its own API keys, so that several independent runs of the traffic can
    share one server start (the tests run several seeds this way). Use :func:`demo_server` to start one."""

    def __init__(self, url: str, versions: int, rows_per_phase: int, input_features: int, noun: str) -> None:
        self.url = url
        self.versions = versions
        self.rows_per_phase = rows_per_phase
        self.input_features = input_features
        self.noun = noun

    @staticmethod
    def key(role: str, version: str) -> str:
        return KEYS[role] if version == "1" else f"{KEYS[role]}-v{version}"

    def watch(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        seed: int,
        version: str = "1",
        labelled: Sequence[Labelled] = ("normal", "drifted", "biased"),
        burst_requests: int | None = 300,
        say: Callable[[str], None] = _quiet,
    ) -> TrafficResult:
        """Send ``labelled`` phases of held-out rows ``x, y`` to ``version``, each followed by its labels and
        an evaluation, then (``burst_requests`` not None) the attacks. Every random choice comes from ``seed``."""
        import httpx

        sampler = Sampler(seed, x, y)
        phases: list[Phase] = []
        views: list[MonitorView] = []
        base = f"{self.url}/v2/models/{MODEL}/versions/{version}"
        url, ops = f"{base}/infer", self.key("ops", version)
        with httpx.Client(timeout=60.0) as client:
            say(f"serving {MODEL} at {self.url} (Open Inference Protocol v2)")

            def look(after: ViewName) -> None:
                doc = client.get(f"{base}/monitoring?evaluate=true", headers={"Authorization": f"Bearer {ops}"})
                doc.raise_for_status()
                views.append(_view(after, doc.json(), self.input_features, self.noun))

            for kind in labelled:
                batch = sampler.batch(self.rows_per_phase, ROWS_PER_REQUEST)
                if kind == "drifted":
                    batch = inverted(batch)
                elif kind == "biased":
                    batch = mirrored_for_minority(batch, POSITIVE_LABEL)
                phase = Phase(kind, PHASE_NAMES[kind])
                send_labelled(client, url, phase, batch, key=self.key(kind, version), prefix=f"v{version}-")
                send_feedback(client, f"{base}/feedback", ops, [phase])
                phases.append(phase)
                look(kind)
            if burst_requests is not None:
                phases.append(send_malformed(client, url, self.key("normal", version)))
                phases.append(send_unauthenticated(client, url, x))
                phases.append(send_burst(client, url, x, self.key("burst", version), burst_requests))
                look("attacks")
            metrics = client.get(
                f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.key('ops', '1')}"}
            ).text
        results = [p.result() for p in phases]
        final = views[-1].snapshot if views else {}
        return TrafficResult(
            seed=seed,
            rows_per_phase=self.rows_per_phase,
            positive_label=POSITIVE_LABEL,
            phases=results,
            views=views,
            labels_sent=sum(p.labels_sent for p in results),
            server_errors=sum(n for p in results for code, n in p.statuses.items() if code >= 500),
            store={k: int(v) for k, v in (final.get("store") or {}).items()},
            metrics_lines=[
                line
                for line in metrics.splitlines()
                if line.startswith(("slipstream_requests_total", "slipstream_rejections_total"))
            ],
        )


@contextmanager
def demo_server(bundle: Path, work: Path, *, rows_per_phase: int = 2000, versions: int = 1) -> Iterator[DemoServer]:
    """Serve ``bundle`` (it must carry a profile) under ``work`` as versions 1..``versions`` of :data:`MODEL`,
    with monitoring windows of ``rows_per_phase`` rows; drained and stopped when the block ends."""
    from slipstream.monitor.config import MonitorConfig
    from slipstream.monitor.fairness import FairnessConfig
    from slipstream.monitor.profile import load_profile
    from slipstream.monitor.quality import QualityConfig
    from slipstream.monitor.store import StoreConfig
    from slipstream.serve.background import ServerThread
    from slipstream.serve.guard import hash_key
    from slipstream.serve.settings import GuardSettings, MonitorServing, ServeSettings

    profile = load_profile(bundle)
    if profile is None:
        from slipstream.errors import ConfigError

        raise ConfigError(
            f"The demo serves a bundle with a monitoring profile; {bundle} has none.",
            hint="Serve a build's winner (the build writes profile.json into it).",
        )
    input_features = sum(len(t.features.names) for t in profile.inputs)
    noun = "image statistics" if all(t.kind == "image" for t in profile.inputs) else "features"
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    numbers = [str(v) for v in range(1, versions + 1)]
    for version in numbers:
        shutil.copytree(bundle, repo / MODEL / version)
    for stale in work.glob("monitor.db*"):
        stale.unlink()
    keys = {DemoServer.key(role, v) for role in KEYS for v in numbers}
    settings = ServeSettings(
        port=0,
        access_log=False,
        version_policy="all",
        guard=GuardSettings(api_key_hashes=frozenset(hash_key(k) for k in keys), rate_per_s=20.0, burst=200),
        monitor=MonitorServing(
            store=StoreConfig(path=work / "monitor.db"),
            config=MonitorConfig(
                evaluate_interval_s=3600.0,  # the demo asks for each evaluation itself (?evaluate=true)
                window_rows=rows_per_phase,
                quality=QualityConfig(window_rows=rows_per_phase),
                fairness=FairnessConfig(positive_label=float(POSITIVE_LABEL)),
            ),
        ),
    )
    with ServerThread(repo, settings) as server:
        yield DemoServer(server.url, versions, rows_per_phase, input_features, noun)


def serve_and_watch(
    bundle: Path,
    work: Path,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    rows_per_phase: int = 2000,
    labelled: Sequence[Labelled] = ("normal", "drifted", "biased"),
    burst_requests: int | None = 300,
    say: Callable[[str], None] = _quiet,
) -> TrafficResult:
    """Serve ``bundle`` under ``work`` and run :meth:`DemoServer.watch` once (what `slipstream demo` does)."""
    with demo_server(bundle, work, rows_per_phase=rows_per_phase) as server:
        return server.watch(x, y, seed=seed, labelled=labelled, burst_requests=burst_requests, say=say)


def _view(after: ViewName, doc: dict[str, Any], input_features: int, noun: str) -> MonitorView:
    drift = doc.get("drift") or {}
    quality = doc.get("quality") or {}
    fairness = doc.get("fairness") or {}
    firing = [
        FiringAlert(
            rule=a["rule"],
            metric=a["metric"],
            value=a.get("value"),
            low=a.get("low"),
            high=a.get("high"),
            reason=a["reason"],
        )
        for a in doc.get("alerts", [])
        if a.get("state") == "firing"
    ]
    return MonitorView(
        after=after,
        requests=int(doc.get("requests") or 0),
        drift_judged=bool(drift.get("judged")),
        drift_method=drift.get("method"),
        drifted_features=list(drift.get("drifted_features") or []),
        input_features=input_features,
        feature_noun=noun,
        realized_accuracy=(quality.get("realized") or {}).get("accuracy"),
        estimated_accuracy=quality.get("estimated_accuracy"),
        fairness_reasons=list(fairness.get("reasons") or []),
        firing=firing,
        snapshot=doc,
    )
