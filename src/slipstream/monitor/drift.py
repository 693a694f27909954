"""Drift: a window of inputs and outputs compared with the reference profile, per feature and overall.

Every window of ``min_rows`` rows or more is decided by a p-value test: chi² of the window's counts in the
reference's decile bins against the reference's own counts (or KS against the reference quantile curve),
corrected for testing every feature, output and the predicted-class mix at once (Benjamini-Hochberg or
Bonferroni). A test decides at every size because its false-alarm rate is fixed by ``alpha`` whatever the
window (measured by ``benchmarks/alert_calibration.py``), while a fixed effect-size threshold is noise at
100 rows (PSI of an unshifted 100-row window is ~0.1) and leaves power unused at thousands (a 0.5 sd shift
of a small-count column has PSI ~0.17, under the usual 0.2, yet is overwhelmingly significant at 2,000 rows).
Tied deciles (discrete and small-count columns) need nothing special: bins between equal edges are empty on
both sides and drop out of the test's degrees of freedom, so the live bins are the distinct values the
deciles fall on. A feature drifts when its corrected p-value is under ``alpha`` and its PSI is at least
``min_psi``, a floor that keeps a negligible but significant shift in a huge window quiet.

The effect sizes are reported for every feature: PSI, Jensen-Shannon distance and a binned Wasserstein-1
distance in reference standard deviations; ``decide_by`` set to one of them restores the older rule (that
effect size's threshold decides windows of ``small_window_rows`` or more). One multivariate signal watches
all input features together: the PCA reconstruction error of the window against the reference's held-out
error. Every result names the method that decided it. String input columns are tested the same way on their
category buckets, unseen values counted apart (:mod:`slipstream.monitor.categorical`).

Cost: binning is vectorized over all columns (see :mod:`slipstream.monitor.binning`); the reference side
(edges, fractions, bin centres) is prepared once when the detector is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from slipstream.errors import InputError
from slipstream.frozen import Frozen
from slipstream.monitor import binning
from slipstream.monitor.categorical import CategoricalDrift, CategoricalWindow, by_tensor, count_window, is_categorical
from slipstream.monitor.features import featurize
from slipstream.monitor.profile import Multivariate, Profile, TensorProfile, predictions, reconstruction_error


class DriftConfig(Frozen):
    """Thresholds and the choice of method."""

    decide_by: Literal["test", "any", "psi", "jensen_shannon", "wasserstein"] = Field(
        default="test",
        description="'test': the corrected p-value test decides every window (with the min_psi floor); an "
        "effect size ('any': one over its threshold) decides windows of small_window_rows rows or more.",
    )
    min_psi: float = Field(
        default=0.02,
        ge=0,
        description="With decide_by='test', a feature drifts only if its PSI is also at least this (a 0.15 sd "
        "mean shift has PSI ~0.02): huge windows make negligible shifts significant.",
    )
    psi_threshold: float = Field(default=0.2, gt=0, description="PSI above this is drift (0.1 moderate, 0.25 big).")
    js_threshold: float = Field(
        default=0.2, gt=0, description="Jensen-Shannon distance (base 2, 0..1) threshold; 0.2 is about PSI 0.2."
    )
    wasserstein_threshold: float = Field(
        default=0.3, gt=0, description="Binned Wasserstein-1 distance, in reference std units, threshold."
    )
    small_window_rows: int = Field(
        default=1000, ge=1, description="With an effect-size decide_by: smaller windows are decided by the test."
    )
    min_rows: int = Field(default=20, ge=1, description="Windows with fewer rows are not judged at all.")
    test: Literal["chi2", "ks"] = Field(
        default="chi2",
        description="The test: chi² on the reference bins (any feature), or KS (continuous features; it loops "
        "over columns, so it is slower on wide windows).",
    )
    correction: Literal["bh", "bonferroni"] = Field(default="bh", description="Multiple-testing correction.")
    alpha: float = Field(
        default=0.0025,
        gt=0,
        lt=1,
        description="Family-wise (bonferroni) or FDR (bh) level over every test in a window. The chi² tail is "
        "a little light at 100 rows: on an exact null (benchmarks/alert_calibration.py) alpha 0.01 gave "
        "1.1-1.9 % false alarms, 0.005 gave 0.7-1.2 %, 0.0025 gives ~0.4 %.",
    )
    multivariate_z: float = Field(
        default=6.0, gt=0, description="z-score of the window's mean PCA reconstruction error that is drift."
    )
    multivariate_max_rows: int = Field(
        default=2000, ge=10, description="The multivariate signal uses at most this many evenly spaced rows."
    )
    multivariate_min_ratio: float = Field(
        default=1.05, ge=1, description="...and the window's mean error must be at least this × the reference's."
    )
    epsilon: float = Field(default=1e-4, gt=0, description="Floor on bin fractions in PSI and JS.")


class DriftTable(Frozen):
    """Per-feature results of one tensor (columnar: every list is indexed by feature)."""

    tensor: str
    method: str = Field(description="What decided 'drifted', e.g. 'psi>0.2' or 'chi2+bh(alpha=0.01)'.")
    features: list[str]
    psi: list[float]
    jensen_shannon: list[float]
    wasserstein: list[float] = Field(description="Binned Wasserstein-1 in reference std units.")
    p_value: list[float] | None = Field(
        default=None, description="Corrected p-values (None when an effect size decided the window)."
    )
    drifted: list[bool]


class MultivariateDrift(Frozen):
    method: str
    window_error: float = Field(description="Mean per-row PCA reconstruction error of the window.")
    reference_error: float
    z: float
    drifted: bool


class DriftReport(Frozen):
    rows: int
    judged: bool = Field(description="False when the window had fewer than min_rows rows.")
    method: str = Field(description="The per-feature decision method used for this window.")
    inputs: list[DriftTable]
    outputs: list[DriftTable]
    prediction: DriftTable | None = Field(default=None, description="Distribution of predicted classes.")
    multivariate: MultivariateDrift | None = None
    drifted_features: list[str] = Field(description="Every drifted input feature, by name.")
    drifted_outputs: list[str] = Field(description="Every drifted output feature (and 'prediction').")
    categorical: list[CategoricalDrift] = Field(
        default_factory=list, description="String input columns: window shares and unseen values (tables in inputs)."
    )

    @property
    def drifted_share(self) -> float:
        total = sum(len(t.features) for t in self.inputs)
        return len(self.drifted_features) / total if total else 0.0


@dataclass(frozen=True)
class _Ref:
    """One tensor's reference side, as arrays, prepared once."""

    name: str
    names: list[str]
    edges: np.ndarray  # [d, 9]
    fractions: np.ndarray  # [d, 10]
    centres: np.ndarray  # [d, 10]
    scale: np.ndarray  # [d]
    quantiles: np.ndarray  # [d, Q]

    @classmethod
    def of(cls, t: TensorProfile) -> _Ref:
        f = t.features
        edges = np.asarray(f.bin_edges, dtype=np.float64)
        lo = np.asarray(f.min, dtype=np.float64)[:, None]
        hi = np.asarray(f.max, dtype=np.float64)[:, None]
        bounds = np.concatenate([lo, edges, hi], axis=1)
        centres = (bounds[:, :-1] + bounds[:, 1:]) / 2
        std = np.asarray(f.std, dtype=np.float64)
        return cls(
            name=t.name,
            names=list(f.names),
            edges=edges,
            fractions=np.asarray(f.bin_fractions, dtype=np.float64),
            centres=centres,
            scale=np.where(std > 1e-12, std, 1.0),
            quantiles=np.asarray(f.quantiles, dtype=np.float64),
        )


# One tested tensor: side, reference (bins or category buckets), psi, js, wasserstein, counts, p-values.
_Row = tuple[str, _Ref | CategoricalWindow, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


def load_statistics() -> None:
    """Import the scipy functions the drift tests use now (~1 s of CPU once), not at the first evaluation: a
    server's monitor process calls this before it reports ready, so the import never lands under load."""
    from scipy.spatial.distance import jensenshannon  # noqa: F401
    from scipy.stats import chi2, false_discovery_control, kstwo  # noqa: F401


def _ks_p(x: np.ndarray, ref: _Ref, levels: np.ndarray, ref_rows: int) -> np.ndarray:
    """KS distance to the reference's piecewise-linear quantile curve (continuous features).

    The p-value uses the two-sample effective size n·m/(n+m), since the reference is a sample too.
    """
    from scipy.stats import kstwo

    n = x.shape[0]
    xs = np.sort(x, axis=0)
    # One np.interp per column against the reference quantile curve: a loop over columns (KS is opt-in).
    cdf = np.stack([np.interp(xs[:, j], ref.quantiles[j], levels) for j in range(xs.shape[1])], axis=1)
    i = np.arange(1, n + 1)[:, None]
    d = np.maximum((i / n - cdf).max(axis=0), (cdf - (i - 1) / n).max(axis=0))
    n_eff = max(round(n * ref_rows / (n + ref_rows)), 1)
    return np.asarray(kstwo.sf(d, n_eff))


def _correct(p: np.ndarray, method: str) -> np.ndarray:
    if p.size == 0:
        return p
    if method == "bonferroni":
        return np.asarray(np.minimum(p * p.size, 1.0))
    from scipy.stats import false_discovery_control

    return np.asarray(false_discovery_control(p, method="bh"))


class DriftDetector:
    """Compares windows with one profile. Build once per model version; :meth:`compare` per window."""

    def __init__(self, profile: Profile, config: DriftConfig | None = None) -> None:
        self.profile = profile
        self.config = config or DriftConfig()
        self._levels = np.asarray(profile.quantile_levels, dtype=np.float64)
        self._inputs = [_Ref.of(t) for t in profile.inputs]
        self._outputs = [_Ref.of(t) for t in profile.outputs]
        spec = profile.prediction
        self._categorical = by_tensor(profile.categorical)
        self._classes = np.asarray(spec.classes if spec else [], dtype=np.float64)
        self._class_p = np.asarray(spec.class_fractions if spec else [], dtype=np.float64)
        mv = profile.multivariate
        self._mv = (
            (np.asarray(mv.mean), 1.0 / np.asarray(mv.scale), np.asarray(mv.components), mv) if mv is not None else None
        )

    def _tested(self, rows: int) -> bool:
        """Whether the p-value test decides a (judged) window of this many rows."""
        return self.config.decide_by == "test" or rows < self.config.small_window_rows

    def _method(self, rows: int) -> str:
        c = self.config
        if rows < c.min_rows:
            return f"none(rows<{c.min_rows})"
        if self._tested(rows):
            test = f"{c.test}+{c.correction}(alpha={c.alpha:g})"
            return f"{test} and psi>={c.min_psi:g}" if c.decide_by == "test" and c.min_psi > 0 else test
        rules = {
            "psi": f"psi>{c.psi_threshold:g}",
            "jensen_shannon": f"jensen_shannon>{c.js_threshold:g}",
            "wasserstein": f"wasserstein>{c.wasserstein_threshold:g}",
        }
        return " or ".join(rules.values()) if c.decide_by == "any" else rules[c.decide_by]

    def _effects(self, x: np.ndarray, ref: _Ref) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if x.shape[1] != ref.edges.shape[0]:
            raise InputError(
                f"Tensor '{ref.name}' has {x.shape[1]} features in the window, {ref.edges.shape[0]} in the profile.",
                input_name=ref.name,
                hint="The profile belongs to another model; rebuild it for this bundle.",
            )
        counts = binning.bin_counts(x, ref.edges)
        q = counts / max(x.shape[0], 1)
        eps = self.config.epsilon
        return (
            counts,
            binning.psi(ref.fractions, q, eps),
            binning.jensen_shannon(ref.fractions, q),
            binning.wasserstein(ref.fractions, q, ref.centres, ref.scale),
        )

    def _decide(self, psi: np.ndarray, js: np.ndarray, ws: np.ndarray) -> np.ndarray:
        c = self.config
        if c.decide_by == "any":
            return (psi > c.psi_threshold) | (js > c.js_threshold) | (ws > c.wasserstein_threshold)
        if c.decide_by == "psi":
            return psi > c.psi_threshold
        if c.decide_by == "jensen_shannon":
            return js > c.js_threshold
        return ws > c.wasserstein_threshold

    def compare(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> DriftReport:
        """Drift of a window (rows stacked along axis 0) of model inputs and, optionally, outputs."""
        feats_in = {k: v if is_categorical(v) else featurize(np.asarray(v)) for k, v in inputs.items()}
        feats_out = {k: featurize(np.asarray(v)) for k, v in (outputs or {}).items()}
        spec = self.profile.prediction
        predicted = None
        if outputs and spec is not None and spec.task == "classification" and spec.output in outputs:
            predicted = predictions(spec, np.asarray(outputs[spec.output]))[0]
        return self.compare_features(feats_in, feats_out or None, predicted)

    def compare_features(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None = None,
        predicted: np.ndarray | None = None,
    ) -> DriftReport:
        """Like :meth:`compare`, on already featurized ``[rows, features]`` matrices (see ``features``) and
        the predicted classes; the server's rolling window keeps exactly these. String inputs come as the
        strings or as their bucket codes (:func:`~slipstream.monitor.categorical.tensor_codes`)."""
        c = self.config
        missing = [r.name for r in self._inputs if r.name not in inputs]
        missing += [name for name in self._categorical if name not in inputs]
        if missing:
            raise InputError(f"The window lacks inputs {missing}; the profile has them.", input_name=missing[0])
        first = self._inputs[0].name if self._inputs else next(iter(self._categorical), "")
        rows = int(np.asarray(inputs[first]).shape[0]) if first else 0
        method = self._method(rows)
        judged = rows >= c.min_rows
        tested = judged and self._tested(rows)
        raw: list[_Row] = []
        feats_in: list[np.ndarray] = []
        for side, refs, arrays in (("in", self._inputs, inputs), ("out", self._outputs, outputs or {})):
            for ref in refs:
                if ref.name not in arrays:
                    continue
                x = np.asarray(arrays[ref.name])
                if side == "in":
                    feats_in.append(x)
                counts, psi, js, ws = self._effects(x, ref)
                pv = None
                if tested:
                    pv = (
                        binning.chi2_p(counts, ref.fractions, self.profile.rows)
                        if c.test == "chi2"
                        else _ks_p(x, ref, self._levels, self.profile.rows)
                    )
                raw.append((side, ref, psi, js, ws, counts, pv))
        # String columns: category buckets, tested and measured like bins (monitor.categorical).
        windows = [count_window(f, inputs[name]) for name, f in self._categorical.items()]
        for w in windows:
            q = w.counts / max(rows, 1)
            psi, js = binning.psi(w.fractions, q, c.epsilon), binning.jensen_shannon(w.fractions, q)
            pv = binning.chi2_p(w.counts, w.fractions, self.profile.rows) if tested else None
            raw.append(("in", w, psi, js, np.zeros_like(psi), w.counts, pv))
        pred_row = self._prediction_effects(predicted, rows, tested) if predicted is not None else None
        # One correction over the whole family of tests in this window.
        corrected: list[np.ndarray] = []
        if tested:
            family = [r[6] for r in raw if r[6] is not None] + (
                [pred_row[4]] if pred_row and pred_row[4] is not None else []
            )
            flat = _correct(np.concatenate(family), c.correction) if family else np.array([])
            offset = 0
            for part in family:
                corrected.append(flat[offset : offset + part.size])
                offset += part.size
        tables_in: list[DriftTable] = []
        tables_out: list[DriftTable] = []
        for i, (side, tested_ref, psi, js, ws, _, _) in enumerate(raw):
            pv_adj = corrected[i] if tested else None
            drifted = self._verdict(judged, psi, js, ws, pv_adj)
            table = DriftTable(
                tensor=tested_ref.name,
                method=method,
                features=tested_ref.names,
                psi=psi.tolist(),
                jensen_shannon=js.tolist(),
                wasserstein=ws.tolist(),
                p_value=None if pv_adj is None else pv_adj.tolist(),
                drifted=drifted.tolist(),
            )
            (tables_in if side == "in" else tables_out).append(table)
        prediction = None
        if pred_row is not None:
            psi, js, ws, names, _ = pred_row
            pv_adj = corrected[-1] if tested else None
            prediction = DriftTable(
                tensor="prediction",
                method=method,
                features=names,
                psi=psi.tolist(),
                jensen_shannon=js.tolist(),
                wasserstein=ws.tolist(),
                p_value=None if pv_adj is None else pv_adj.tolist(),
                drifted=self._verdict(judged, psi, js, np.zeros_like(ws), pv_adj).tolist(),
            )
        mv = self._multivariate(np.concatenate(feats_in, axis=1), judged, self._mv) if self._mv and feats_in else None
        drifted_in = [n for t in tables_in for n, d in zip(t.features, t.drifted, strict=True) if d]
        drifted_out = [n for t in tables_out for n, d in zip(t.features, t.drifted, strict=True) if d]
        if prediction is not None and prediction.drifted[0]:
            drifted_out.append("prediction")
        return DriftReport(
            rows=rows,
            judged=judged,
            method=method,
            inputs=tables_in,
            outputs=tables_out,
            prediction=prediction,
            multivariate=mv,
            drifted_features=drifted_in,
            drifted_outputs=drifted_out,
            categorical=[d for w in windows for d in w.details],
        )

    def _verdict(
        self, judged: bool, psi: np.ndarray, js: np.ndarray, ws: np.ndarray, p_adj: np.ndarray | None
    ) -> np.ndarray:
        if not judged:
            return np.zeros(psi.shape, dtype=bool)
        c = self.config
        if p_adj is not None:
            significant = p_adj < c.alpha
            return np.asarray(significant & (psi >= c.min_psi) if c.decide_by == "test" else significant)
        return self._decide(psi, js, ws)

    def _prediction_effects(
        self, pred: np.ndarray, rows: int, tested: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], np.ndarray | None] | None:
        if self._classes.size == 0:
            return None
        counts = binning.category_counts(pred, self._classes)[None, :]
        p = np.append(self._class_p, 0.0)[None, :]
        q = counts / max(rows, 1)
        eps = self.config.epsilon
        pv = binning.chi2_p(counts, p, self.profile.rows) if tested else None
        return binning.psi(p, q, eps), binning.jensen_shannon(p, q), np.zeros(1), ["prediction.class"], pv

    def _multivariate(
        self, x: np.ndarray, judged: bool, mv: tuple[np.ndarray, np.ndarray, np.ndarray, Multivariate]
    ) -> MultivariateDrift:
        mean, inv_scale, comps, ref = mv
        c = self.config
        step = max(1, -(-x.shape[0] // c.multivariate_max_rows))
        rows = x[::step]
        dtype = rows.dtype if rows.dtype == np.float32 else np.float64
        z = (rows - mean.astype(dtype)) * inv_scale.astype(dtype)
        err = reconstruction_error(z, comps.astype(dtype))
        m = float(err.mean()) if err.size else 0.0
        n = max(err.size, 1)
        zscore = (m - ref.error_mean) / max(ref.error_std / np.sqrt(n), 1e-12)
        drifted = judged and zscore > c.multivariate_z and m > c.multivariate_min_ratio * ref.error_mean
        return MultivariateDrift(
            method=f"pca_reconstruction(k={comps.shape[0]}, rows={err.size}, z>{c.multivariate_z:g}, "
            f"ratio>{c.multivariate_min_ratio:g})",
            window_error=m,
            reference_error=ref.error_mean,
            z=float(zscore),
            drifted=bool(drifted),
        )
