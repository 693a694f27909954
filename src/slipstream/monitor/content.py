"""Content drift: the reference samples the profile keeps, and the two tests the monitor runs on them.

Per-channel pixel statistics miss a flipped or rotated image, blur at equal brightness and a change in the
class mix; token ids are not features at all. So the profile also keeps, for up to ``content_sample_rows``
reference rows, what the model made of its inputs:

* a classifier's **probabilities** (softmax of its logits when it outputs logits), which the monitor compares
  with the window's by black-box shift detection (:class:`~slipstream.monitor.shift.OutputShiftDetector`:
  KS per class column plus chi² on the predicted class, Bonferroni; Rabanser et al. 2019);
* an **embedding**: an embedding model's own output (a float vector that is neither probabilities nor
  logits, e.g. the MiniLM sentence encoder), or a classifier's penultimate activations when the bundle
  exposes them as the monitoring-only output :data:`EMBEDDING_OUTPUT`; compared by an MMD permutation test
  (:class:`~slipstream.monitor.shift.MMDDetector`).

The window side costs the request path nothing: the monitor already keeps the newest ``window_rows`` rows of
every numeric output (:class:`~slipstream.monitor.ingest.Ingestor`), and the tests run in
:meth:`ContentDrift.test` on the evaluation cadence. A profile built before content drift existed has no
samples; both tests are then off and :attr:`ContentDrift.notes` says why.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field

from slipstream.errors import SchemaError, SlipstreamError
from slipstream.frozen import Frozen
from slipstream.monitor.shift import MMDDetector, OutputShiftDetector, ShiftResult, softmax

EMBEDDING_OUTPUT = "slipstream.embedding"
"""Name of the monitoring-only output holding a classifier's penultimate activations (never shown to clients)."""

MIN_EMBEDDING_WIDTH = 8
"""A float output with at least this many values per row, that is not a classifier's scores, is an embedding
(a regression with a few outputs is not: its univariate drift per output already covers it)."""


class EncodedArray(Frozen):
    """A 2-D float array as little-endian bytes in base64: compact inside profile.json, exact to its dtype."""

    dtype: Literal["float16", "float32"] = Field(description="Element type of the bytes.")
    shape: tuple[int, int] = Field(description="[rows, columns].")
    data: str = Field(description="base64 of the row-major little-endian bytes.")

    @classmethod
    def encode(cls, array: np.ndarray, dtype: Literal["float16", "float32"]) -> EncodedArray:
        a = np.ascontiguousarray(np.asarray(array).reshape(len(array), -1), dtype=np.dtype(dtype).newbyteorder("<"))
        return cls(dtype=dtype, shape=(a.shape[0], a.shape[1]), data=base64.b64encode(a.tobytes()).decode("ascii"))

    def decode(self) -> np.ndarray:
        """The array as float32 ``[rows, columns]``."""
        raw = base64.b64decode(self.data)
        dtype = np.dtype(self.dtype).newbyteorder("<")
        if len(raw) != self.shape[0] * self.shape[1] * dtype.itemsize:
            raise SchemaError(
                f"A profile sample of shape {list(self.shape)} ({self.dtype}) holds {len(raw)} bytes; expected "
                f"{self.shape[0] * self.shape[1] * dtype.itemsize}.",
                path="profile.json",
                hint="The profile is damaged: rebuild it.",
            )
        return np.frombuffer(raw, dtype=dtype).reshape(self.shape).astype(np.float32)


class ReferenceSample(Frozen):
    """Reference rows of one quantity a content test compares with."""

    output: str = Field(description="The model output the rows come from.")
    source: Literal["probabilities", "softmax_of_logits", "embedding_output", "penultimate"] = Field(
        description="What the rows are: the output as-is, the softmax of logits, or an embedding."
    )
    values: EncodedArray = Field(description="The rows (probabilities float32; embeddings float16).")


class ContentReference(Frozen):
    """The profile's samples for the content tests; a missing one comes with the reason in ``notes``."""

    rows: int = Field(ge=0, description="Reference rows sampled (evenly at random, seeded).")
    probabilities: ReferenceSample | None = Field(default=None, description="Classifiers: class probabilities.")
    embedding: ReferenceSample | None = Field(default=None, description="Embedding rows, when the model has one.")
    notes: list[str] = Field(default_factory=list, description="Why a sample is missing.")


def _embedding_output(
    outputs: Mapping[str, np.ndarray], prediction_output: str | None, is_classifier: bool, chosen: str | None
) -> tuple[str, Literal["embedding_output", "penultimate"]] | None:
    if chosen is not None:
        return chosen, "penultimate" if chosen == EMBEDDING_OUTPUT else "embedding_output"
    if EMBEDDING_OUTPUT in outputs:
        return EMBEDDING_OUTPUT, "penultimate"
    if is_classifier:
        return None
    for name, value in outputs.items():
        a = np.asarray(value)
        vector = a.ndim == 2 and a.dtype.kind == "f" and a.shape[1] >= MIN_EMBEDDING_WIDTH
        if vector and (prediction_output is None or name == prediction_output or len(outputs) == 1):
            return name, "embedding_output"
    return None


def build_content_reference(
    outputs: Mapping[str, np.ndarray],
    *,
    prediction_output: str | None,
    prediction_kind: str | None,
    is_classifier: bool,
    rows: int,
    seed: int,
    embedding_output: str | None = None,
) -> ContentReference:
    """Samples of up to ``rows`` reference rows for the content tests (see the module docstring)."""
    n = int(np.asarray(next(iter(outputs.values()))).shape[0])
    take = np.sort(np.random.default_rng(seed).permutation(n)[: min(rows, n)])
    notes: list[str] = []
    probs = None
    if is_classifier and prediction_output is not None and prediction_kind in ("probabilities", "logits"):
        scores = np.asarray(outputs[prediction_output])[take]
        source: Literal["probabilities", "softmax_of_logits"] = "probabilities"
        if prediction_kind == "logits":
            scores, source = softmax(scores), "softmax_of_logits"
        # float32: probabilities pile up near 0 and 1, where float16 rounding would itself look like a shift.
        probs = ReferenceSample(output=prediction_output, source=source, values=EncodedArray.encode(scores, "float32"))
    elif is_classifier:
        notes.append("output shift: the model outputs labels only, no class probabilities to compare")
    else:
        notes.append("output shift: not a classifier (its outputs are compared per value by the drift table)")
    embedding = None
    picked = _embedding_output(outputs, prediction_output, is_classifier, embedding_output)
    if picked is None:
        notes.append(
            "embedding shift: the bundle exposes no penultimate activations ('slipstream.embedding')"
            if is_classifier
            else f"embedding shift: no float output of >= {MIN_EMBEDDING_WIDTH} values per row to compare"
        )
    else:
        name, kind = picked
        a = np.asarray(outputs[name])
        a = a.reshape(a.shape[0], -1)[take]
        # float16 halves the file: the kernel test is smooth in the rows, and rounding (1e-3 relative) moved no
        # verdict (100 null windows: same alarms, p-values within 0.015). float32 where float16 would overflow.
        wide = a.size > 0 and float(np.abs(a).max()) > 6e4
        embedding = ReferenceSample(
            output=name, source=kind, values=EncodedArray.encode(a, "float32" if wide else "float16")
        )
    return ContentReference(rows=int(take.size), probabilities=probs, embedding=embedding, notes=notes)


class ContentDriftConfig(Frozen):
    """The two content tests in the live monitor."""

    enabled: bool = Field(default=True, description="Run the output-shift and embedding tests at each evaluation.")
    alpha: float = Field(
        default=0.01, gt=0, lt=1, description="Significance level of each test (per evaluation, corrected inside)."
    )
    min_rows: int = Field(default=20, ge=2, description="Windows with fewer rows are not judged.")
    permutations: int = Field(default=200, ge=10, description="MMD permutations (p-value resolution 1/(n+1)).")
    max_window_rows: int = Field(
        default=1000, ge=10, description="MMD uses at most this many of the newest window rows (evenly spaced)."
    )
    seed: int = Field(default=0, description="Seed of the MMD permutations.")


class ContentDrift:
    """The detectors of one model version, built once from its profile (the reference side is prepared then)."""

    def __init__(self, reference: ContentReference | None, config: ContentDriftConfig | None = None) -> None:
        c = self.config = config or ContentDriftConfig()
        self.notes: list[str] = []
        self.probabilities: ReferenceSample | None = None
        self.embedding: ReferenceSample | None = None
        self._output_shift: OutputShiftDetector | None = None
        self._mmd: MMDDetector | None = None
        if not c.enabled:
            self.notes.append("content drift is off (content_drift.enabled=false)")
            return
        if reference is None:
            self.notes.append(
                "content drift: the profile has no reference samples (built before they existed); rebuild it "
                "to test the model's outputs and embedding"
            )
            return
        self.notes.extend(reference.notes)
        self.probabilities, self.embedding = reference.probabilities, reference.embedding
        if self.probabilities is not None:
            self._output_shift = OutputShiftDetector(
                self.probabilities.values.decode(), alpha=c.alpha, min_rows=c.min_rows
            )
        if self.embedding is not None:
            self._mmd = MMDDetector(
                self.embedding.values.decode(),
                alpha=c.alpha,
                permutations=c.permutations,
                max_window_rows=c.max_window_rows,
                min_rows=c.min_rows,
                seed=c.seed,
            )

    @property
    def active(self) -> bool:
        return self._output_shift is not None or self._mmd is not None

    def test(self, outputs: Mapping[str, np.ndarray]) -> tuple[ShiftResult | None, ShiftResult | None, list[str]]:
        """``(output_shift, embedding_shift, notes)`` on the window's outputs (rows oldest first); a test is
        None where it is off, its output is missing from the window, or the window cannot be tested (a NaN
        row, say): ``notes`` says which and why. Never raises: the rest of the evaluation goes on."""
        notes = list(self.notes)
        out = emb = None
        if self._output_shift is not None and self.probabilities is not None:
            window = outputs.get(self.probabilities.output)
            if window is None:
                notes.append(f"output shift: no rows of '{self.probabilities.output}' in the window yet")
            else:
                try:
                    if self.probabilities.source == "softmax_of_logits":
                        window = softmax(window)
                    out = self._output_shift.test(np.asarray(window))
                except SlipstreamError as exc:
                    notes.append(f"output shift: the window could not be tested: {exc}")
        if self._mmd is not None and self.embedding is not None:
            window = outputs.get(self.embedding.output)
            if window is None:
                notes.append(f"embedding shift: no rows of '{self.embedding.output}' in the window yet")
            else:
                try:
                    emb = self._mmd.test(np.asarray(window).reshape(len(window), -1)[-self.config.max_window_rows :])
                except SlipstreamError as exc:
                    notes.append(f"embedding shift: the window could not be tested: {exc}")
        return out, emb, notes
