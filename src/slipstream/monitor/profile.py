"""The reference profile: what a model's inputs and outputs looked like on the data it was built with.

Stored as ``profile.json`` in a bundle (a new bundle, step ``profile@1``). Everything the server needs to
compare a window with the reference is prepared here once: decile bin edges and the reference's fraction in
each bin, quantiles, mean and std, class frequencies, the confidence calibration for label-free accuracy
estimates, a PCA basis for the multivariate drift signal and the per-request out-of-distribution score,
reference samples of the model's probabilities and embedding for the content tests (:mod:`.content`), and a
classifier's top-2 margins for the boundary-probing signal (:mod:`.probing`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from slipstream.errors import ConfigError, DataError, SchemaError
from slipstream.frozen import Frozen
from slipstream.monitor import binning
from slipstream.monitor._blas import cross
from slipstream.monitor.categorical import CategoricalFeature, categorical_inputs, is_categorical
from slipstream.monitor.content import EMBEDDING_OUTPUT, ContentReference, build_content_reference
from slipstream.monitor.features import TensorKind, channel_pixels, feature_names, featurize, tensor_kind
from slipstream.monitor.probing import MarginReference, margin_reference

if TYPE_CHECKING:
    from slipstream.data.datasets import Dataset

PROFILE_FILE = "profile.json"
PROFILE_SCHEMA_VERSION = 4  # 2: ``content``; 3: ``categorical``; 4: ``margin``; versions 1 to 3 still load
PROFILE_STEP = "profile@1"
QUANTILE_LEVELS: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
QUANTILE_LEVELS += (0.95, 0.99, 1.0)
DECILE_LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Task = Literal["classification", "regression"]
PredictionKind = Literal["probabilities", "logits", "labels", "values"]


class ProfileConfig(Frozen):
    """How to build a profile."""

    task: Literal["auto", "classification", "regression"] = Field(
        default="auto", description="The model's task; 'auto' reads it from the output dtypes and values."
    )
    prediction_output: str | None = Field(
        default=None, description="The output holding the prediction; None picks it (probabilities > labels > first)."
    )
    pca_variance: float = Field(
        default=0.9, gt=0, le=1, description="Share of standardized variance the PCA basis keeps."
    )
    pca_max_components: int = Field(default=32, ge=1, description="Upper bound on PCA components.")
    pca_max_features: int = Field(
        default=4096, ge=1, description="Skip the multivariate signal above this many input features."
    )
    pca_max_rows: int = Field(default=5000, ge=10, description="Rows used to fit the PCA (and as many held out).")
    calibration_bins: int = Field(default=20, ge=2, description="Equal-width confidence bins for calibration.")
    calibration_prior_rows: float = Field(
        default=10.0, ge=0, description="Pseudo-rows pulling each bin's accuracy towards its mean confidence."
    )
    seed: int = Field(default=0, description="Seed for the PCA fit/held-out split and the content samples.")
    categorical_top_k: int = Field(
        default=20, ge=1, description="String columns: categories kept by name; the rest share an 'other' bucket."
    )
    categorical_max_vocabulary: int = Field(
        default=10_000, ge=0, description="String columns: 'other' names stored to tell rare values from unseen."
    )
    content_sample_rows: int = Field(
        default=1000, ge=0, description="Reference rows kept for the output-shift and embedding tests (0: none)."
    )
    embedding_output: str | None = Field(
        default=None,
        description="The output holding an embedding; None picks 'slipstream.embedding', else (non-classifiers) "
        "a float output of >= 8 values per row.",
    )


class FeatureSet(Frozen):
    """Column-wise statistics of one tensor's features; every list is indexed by feature."""

    names: list[str] = Field(description="Feature names, e.g. 'pixels[3]' or 'image[c0].mean'.")
    min: list[float] = Field(description="Smallest reference value per feature.")
    max: list[float] = Field(description="Largest reference value per feature.")
    mean: list[float] = Field(description="Reference mean per feature.")
    std: list[float] = Field(description="Reference standard deviation per feature.")
    quantiles: list[list[float]] = Field(description="Per feature, the values at QUANTILE_LEVELS.")
    bin_edges: list[list[float]] = Field(description="Per feature, 9 decile edges (repeated where tied).")
    bin_fractions: list[list[float]] = Field(description="Per feature, the reference's share in each of 10 bins.")


class ChannelSummary(Frozen):
    """Pixel statistics of one image channel over the whole reference."""

    channel: int
    min: float
    max: float
    mean: float
    std: float
    quantiles: list[float] = Field(description="Pixel values at QUANTILE_LEVELS.")


class TensorProfile(Frozen):
    name: str = Field(description="The tensor's name in the model.")
    kind: TensorKind = Field(description="'tabular' (columns are features) or 'image' (per-channel summaries).")
    row_shape: list[int] = Field(description="Shape of one row (without the batch axis).")
    features: FeatureSet
    channels: list[ChannelSummary] = Field(default_factory=list, description="Images only: per channel.")


class PredictionSpec(Frozen):
    """Where the prediction comes from and how to read it."""

    task: Task
    output: str = Field(description="The output tensor holding the prediction.")
    kind: PredictionKind = Field(description="How that output encodes the prediction.")
    classes: list[float] = Field(default_factory=list, description="Classification: the class values seen.")
    class_fractions: list[float] = Field(default_factory=list, description="Share of each predicted class.")


class Calibration(Frozen):
    """Histogram binning of the top-class confidence against correctness (for CBPE-style estimates)."""

    method: Literal["histogram_binning"] = "histogram_binning"
    edges: list[float] = Field(description="Inner confidence bin edges (equal width on [0, 1]).")
    accuracy: list[float] = Field(description="Observed accuracy in each bin (len(edges) + 1).")
    counts: list[int] = Field(description="Reference rows in each bin.")


class Multivariate(Frozen):
    """PCA basis on standardized input features; reconstruction error stats from a held-out half."""

    method: Literal["pca_reconstruction"] = "pca_reconstruction"
    mean: list[float]
    scale: list[float] = Field(description="Std per feature (1 where the feature is constant).")
    components: list[list[float]] = Field(description="[k, features] orthonormal rows.")
    error_mean: float = Field(description="Mean per-row squared reconstruction error per feature (held-out).")
    error_std: float
    error_q99: float = Field(description="99th percentile of the held-out per-row error.")


class Profile(Frozen):
    """profile.json."""

    schema_version: int = Field(default=PROFILE_SCHEMA_VERSION, description="profile.json schema version.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    rows: int = Field(ge=1, description="Reference rows the profile was built from.")
    quantile_levels: list[float] = Field(default_factory=lambda: list(QUANTILE_LEVELS))
    inputs: list[TensorProfile]
    outputs: list[TensorProfile]
    prediction: PredictionSpec | None = Field(default=None, description="None when no output could be read.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Build-time accuracy etc., with labels.")
    calibration: Calibration | None = None
    multivariate: Multivariate | None = None
    content: ContentReference | None = Field(
        default=None, description="Samples for the content tests; None in profiles from before schema 2."
    )
    categorical: list[CategoricalFeature] = Field(
        default_factory=list, description="String (BYTES) input columns as categories (monitor.categorical)."
    )
    margin: MarginReference | None = Field(
        default=None, description="Classifiers: the top-2 margins (monitor.probing); None before schema 4."
    )

    def to_json_bytes(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, *, source: str = PROFILE_FILE) -> Profile:
        import json

        from pydantic import ValidationError

        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise SchemaError(f"{source} is not valid JSON ({exc}).", path=source, hint="Rebuild the profile.") from exc
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and version > PROFILE_SCHEMA_VERSION:
            raise SchemaError(
                f"{source} has schema version {version}; this slipstream reads up to {PROFILE_SCHEMA_VERSION}.",
                path=source,
                hint="Upgrade slipstream.",
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise SchemaError(f"{source} does not match the profile schema: {exc}", path=source) from exc


def _feature_set(names: list[str], x: np.ndarray) -> FeatureSet:
    q = np.quantile(x, QUANTILE_LEVELS, axis=0).T
    edges = binning.decile_edges(x, np.asarray(DECILE_LEVELS))
    counts = binning.bin_counts(x, edges)
    return FeatureSet(
        names=names,
        min=x.min(axis=0).tolist(),
        max=x.max(axis=0).tolist(),
        mean=x.mean(axis=0).tolist(),
        std=x.std(axis=0).tolist(),
        quantiles=q.tolist(),
        bin_edges=edges.tolist(),
        bin_fractions=(counts / x.shape[0]).tolist(),
    )


def _tensor_profile(name: str, array: np.ndarray) -> TensorProfile:
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise DataError(f"Tensor '{name}' has dtype {a.dtype}; the profile covers numeric tensors only.")
    x = featurize(a).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise DataError(f"Tensor '{name}' has NaN or infinite values; the reference must be finite.", source=name)
    kind = tensor_kind(a.shape)
    channels: list[ChannelSummary] = []
    if kind == "image":
        for c, px in enumerate(channel_pixels(a)):
            channels.append(
                ChannelSummary(
                    channel=c,
                    min=float(px.min()),
                    max=float(px.max()),
                    mean=float(px.mean()),
                    std=float(px.std()),
                    quantiles=np.quantile(px, QUANTILE_LEVELS).tolist(),
                )
            )
    return TensorProfile(
        name=name,
        kind=kind,
        row_shape=list(a.shape[1:]),
        features=_feature_set(feature_names(name, a.shape), x),
        channels=channels,
    )


def _looks_like_probabilities(a: np.ndarray) -> bool:
    if a.ndim != 2 or a.shape[1] < 2 or a.dtype.kind != "f":
        return False
    return bool(np.all(a >= -1e-6) and np.all(a <= 1 + 1e-6) and np.allclose(a.sum(axis=1), 1.0, atol=1e-3))


def _pick_prediction(outputs: Mapping[str, np.ndarray], config: ProfileConfig) -> tuple[str, Task, PredictionKind]:
    names = list(outputs)
    if config.prediction_output is not None:
        if config.prediction_output not in outputs:
            raise ConfigError(
                f"prediction_output {config.prediction_output!r} is not an output; outputs are {names}.",
                field="prediction_output",
            )
        names = [config.prediction_output]
    probs = [n for n in names if _looks_like_probabilities(np.asarray(outputs[n]))]
    labels = [n for n in names if np.asarray(outputs[n]).dtype.kind in "biu"]
    if config.task == "regression":
        return names[0], "regression", "values"
    if probs:
        return probs[0], "classification", "probabilities"
    if labels:
        return labels[0], "classification", "labels"
    first = np.asarray(outputs[names[0]])
    if config.task == "classification":
        if first.ndim == 2 and first.shape[1] > 1:
            return names[0], "classification", "logits"
        return names[0], "classification", "labels"
    return names[0], "regression", "values"


def predictions(spec: PredictionSpec, output: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(prediction, confidence)`` per row from the prediction output; confidence for scored classifiers."""
    a = np.asarray(output)
    if spec.kind == "probabilities":
        return a.argmax(axis=1).astype(np.float64), a.max(axis=1).astype(np.float64)
    if spec.kind == "logits":
        z = a - a.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p.argmax(axis=1).astype(np.float64), p.max(axis=1)
    flat = a.reshape(a.shape[0], -1)
    return flat[:, 0].astype(np.float64), None


def _calibration(confidence: np.ndarray, correct: np.ndarray, bins: int, prior_rows: float) -> Calibration:
    """Equal-width confidence bins; each bin's accuracy is shrunk towards its mean confidence by
    ``prior_rows`` pseudo-rows, so bins the reference barely visits (low confidence, on a good model) read
    close to the identity instead of to a handful of lucky hits."""
    edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    index = np.searchsorted(edges, confidence, side="right")
    counts = np.bincount(index, minlength=bins)
    hits = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    mids = (np.concatenate([[0.0], edges]) + np.concatenate([edges, [1.0]])) / 2
    prior = np.where(counts > 0, conf_sum / np.maximum(counts, 1), mids)
    acc = (hits + prior_rows * prior) / (counts + prior_rows)
    return Calibration(edges=edges.tolist(), accuracy=acc.tolist(), counts=counts.astype(int).tolist())


def _multivariate(x: np.ndarray, config: ProfileConfig) -> Multivariate | None:
    rows, d = x.shape
    if d > config.pca_max_features or rows < 20 or d < 2:
        return None
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(rows)
    half = min(rows // 2, config.pca_max_rows)
    fit, held = x[order[:half]], x[order[half : 2 * half]]
    mean = fit.mean(axis=0)
    scale = fit.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (fit - mean) / scale
    # Eigen-decomposition of the d × d covariance: far cheaper than an SVD of the rows when rows >> d.
    eigval, eigvec = np.linalg.eigh(z.T @ z / max(len(z) - 1, 1))
    var = np.maximum(eigval[::-1], 0.0)
    share = np.cumsum(var) / max(var.sum(), 1e-12)
    k = int(min(np.searchsorted(share, config.pca_variance) + 1, config.pca_max_components, d - 1))
    comps = eigvec[:, ::-1][:, :k].T
    err = reconstruction_error((held - mean) / scale, comps)
    return Multivariate(
        mean=mean.tolist(),
        scale=scale.tolist(),
        components=comps.tolist(),
        error_mean=float(err.mean()),
        error_std=float(err.std()),
        error_q99=float(np.quantile(err, 0.99)),
    )


def reconstruction_error(z: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Per-row mean squared residual of standardized rows ``z`` after projecting on ``components``.

    With orthonormal components the residual is ``|z|² - |z Cᵀ|²``: one thin matrix product, no
    reconstruction.
    """
    if z.shape[0] == 1:  # one request (the screen): two dot products, no reductions over axes
        proj1 = components @ z[0]
        return np.array([max(float(np.vdot(z, z) - np.vdot(proj1, proj1)), 0.0) / z.shape[1]])
    if z.shape[0] <= 4:  # a few rows: a GEMM this small runs on this thread, einsum's set-up dominates
        proj = z @ components.T
        resid = (z * z).sum(axis=1) - (proj * proj).sum(axis=1)
        return np.asarray(np.maximum(resid, 0.0) / z.shape[1], dtype=np.float64)
    # Small products (an ingest batch) stay off BLAS's threads (_blas.cross); large windows (drift) are worth them.
    proj = cross(z, components) if z.shape[0] * components.size < 2_000_000 else z @ components.T
    resid = np.einsum("ij,ij->i", z, z) - np.einsum("ij,ij->i", proj, proj)
    return np.asarray(np.maximum(resid, 0.0) / z.shape[1], dtype=np.float64)


def build_profile(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    config: ProfileConfig | None = None,
) -> Profile:
    """A reference profile from the model's inputs and outputs on reference data (rows along axis 0)."""
    cfg = config or ProfileConfig()
    if not inputs or not outputs:
        raise DataError("A profile needs at least one input and one output array.")
    rows = {name: np.asarray(a).shape[0] for name, a in [*inputs.items(), *outputs.items()]}
    if len(set(rows.values())) != 1:
        raise DataError(f"Every array must have the same number of rows; got {rows}.", hint="Align the arrays.")
    n = next(iter(rows.values()))
    if n < 2:
        raise DataError(f"A profile needs at least 2 reference rows; got {n}.")
    numeric = {k: v for k, v in inputs.items() if not is_categorical(np.asarray(v))}
    in_profiles = [_tensor_profile(k, v) for k, v in numeric.items()]
    # The monitoring-only embedding is no prediction and no per-value drift feature: only the MMD test reads it.
    served = {k: v for k, v in outputs.items() if k != EMBEDDING_OUTPUT} or dict(outputs)
    out_profiles = [_tensor_profile(k, v) for k, v in served.items() if np.asarray(v).dtype.kind in "biuf"]
    out_name, task, kind = _pick_prediction(served, cfg)
    spec = PredictionSpec(task=task, output=out_name, kind=kind)
    pred, conf = predictions(spec, np.asarray(outputs[out_name]))
    metrics: dict[str, float] = {}
    calibration = None
    if task == "classification":
        classes, counts = np.unique(pred, return_counts=True)
        if labels is not None:
            classes = np.union1d(classes, np.unique(np.asarray(labels, dtype=np.float64)))
            counts = binning.category_counts(pred, classes)[:-1]
        spec = spec.model_copy(update={"classes": classes.tolist(), "class_fractions": (counts / n).tolist()})
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if y.shape[0] != n:
            raise DataError(f"Got {y.shape[0]} labels for {n} reference rows.", hint="Give one label per row.")
        if task == "classification":
            from slipstream.evaluate.metrics import f1_macro

            correct = pred == y
            metrics = {"accuracy": float(correct.mean()), "f1_macro": f1_macro(pred, y), "labeled_rows": float(n)}
            if conf is not None:
                calibration = _calibration(conf, correct, cfg.calibration_bins, cfg.calibration_prior_rows)
        else:
            metrics = {"mae": float(np.mean(np.abs(pred - y))), "labeled_rows": float(n)}
    feats = [featurize(np.asarray(v)).astype(np.float64) for v in numeric.values()]
    categorical = categorical_inputs(inputs, top_k=cfg.categorical_top_k, max_vocabulary=cfg.categorical_max_vocabulary)
    if cfg.embedding_output is not None and cfg.embedding_output not in outputs:
        raise ConfigError(
            f"embedding_output {cfg.embedding_output!r} is not an output; outputs are {list(outputs)}.",
            field="embedding_output",
        )
    content = None
    if cfg.content_sample_rows > 0:
        content = build_content_reference(
            outputs,
            prediction_output=out_name,
            prediction_kind=kind,
            is_classifier=task == "classification",
            rows=cfg.content_sample_rows,
            seed=cfg.seed,
            embedding_output=cfg.embedding_output,
        )
    return Profile(
        rows=n,
        inputs=in_profiles,
        outputs=out_profiles,
        prediction=spec,
        metrics=metrics,
        calibration=calibration,
        multivariate=_multivariate(np.concatenate(feats, axis=1), cfg) if feats else None,
        content=content,
        categorical=categorical,
        margin=margin_reference(kind, np.asarray(outputs[out_name])) if task == "classification" else None,
    )


def load_profile(bundle_dir: str | Path) -> Profile | None:
    """The profile of a bundle directory, or None when it has none. Verify the bundle first (Bundle.load)."""
    path = Path(bundle_dir) / PROFILE_FILE
    if not path.is_file():
        return None
    return Profile.from_json_bytes(path.read_bytes(), source=str(path))


def write_profiled_bundle(
    bundle_dir: str | Path,
    dest: str | Path,
    profile: Profile,
    *,
    overwrite: bool = False,
) -> Path:
    """A NEW bundle at ``dest``: the source bundle plus ``profile.json``, lineage step ``profile@1``.

    The source bundle is verified and left untouched; its side files are carried over.
    """
    from slipstream.artifact.bundle import MANIFEST_FILE, MODEL_FILE, Bundle, Step, write_bundle

    started = time.perf_counter()
    source = Bundle.load(bundle_dir)
    extra = {
        name: (source.path / name).read_bytes()
        for name in source.manifest.files
        if name not in (MODEL_FILE, MANIFEST_FILE, PROFILE_FILE, "model.onnx.data")
    }
    extra[PROFILE_FILE] = profile.to_json_bytes()
    step = Step(
        name=PROFILE_STEP,
        config={"rows": profile.rows, "task": profile.prediction.task if profile.prediction else None},
        duration_s=time.perf_counter() - started,
        input_sha256=source.model_sha256,
    )
    out = write_bundle(dest, source.load_model(), source.manifest, step=step, extra_files=extra, overwrite=overwrite)
    return out.path


def profile_from_bundle(
    bundle_dir: str | Path,
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    config: ProfileConfig | None = None,
    *,
    batch_size: int = 256,
) -> Profile:
    """Run the bundle's model (on its recorded engine, CPU) on reference inputs and profile inputs and outputs."""
    from slipstream.artifact.bundle import Bundle
    from slipstream.runtime.open import open_engine

    engine = open_engine(Bundle.load(bundle_dir))  # the engine the bundle records, as serve runs it
    fetch = [s.name for s in engine.outputs] + list(engine.monitoring_outputs)  # the embedding, when exposed
    n = next(iter(inputs.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        out = engine.run({k: np.asarray(v)[start : start + batch_size] for k, v in inputs.items()}, fetch)
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v))
    outputs = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
    return build_profile(inputs, outputs, labels, config)


def profile_from_dataset(
    bundle_dir: str | Path, dataset: Dataset, config: ProfileConfig | None = None, *, batch_size: int = 256
) -> Profile:
    """:func:`profile_from_bundle` on a checked :class:`slipstream.data.datasets.Dataset` (labels included)."""
    return profile_from_bundle(bundle_dir, dataset.inputs, dataset.labels, config, batch_size=batch_size)
