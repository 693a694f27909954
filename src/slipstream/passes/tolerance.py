"""How far a pass may move a model's outputs, declared by the pass and checked by the conformance suite.

A shape check passes a pass that zeroes every weight. A declared bound does not: fusion promises
float32 round-off, fp16 a hundredth of the output's scale, int8 and pruning only that the predicted
class mostly stays the same. The bound is a property of the pass (a class attribute), so a new pass
states its own promise where it is written, and the suite holds it to it on real data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Bounds on the change of every float output between a pass's input and output model.

    ``max_rel_error``: max |new - old| over all elements, divided by max |old| (so the bound does not
    depend on the output's scale). ``min_top1``: the share of rows whose arg-max over the last axis
    is unchanged (for lossy passes where elementwise error says little). None leaves a measure unchecked;
    a pass declares at least one.
    """

    max_rel_error: float | None = None
    min_top1: float | None = None

    def problems(self, want: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> list[str]:
        """Every way ``got`` breaks this tolerance against ``want`` (empty when it holds)."""
        if self.max_rel_error is None and self.min_top1 is None:
            return ["the pass declares no tolerance"]
        found: list[str] = []
        for name, ref in want.items():
            if name not in got:
                found.append(f"output {name!r} is missing")
                continue
            new = np.asarray(got[name])
            if new.shape != ref.shape:
                found.append(f"output {name!r} has shape {list(new.shape)}, expected {list(ref.shape)}")
                continue
            if ref.dtype.kind != "f":
                continue
            ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
            if not np.isfinite(new64).all():
                found.append(f"output {name!r} has non-finite values")
                continue
            if self.max_rel_error is not None:
                rel = float(np.abs(new64 - ref64).max() / max(float(np.abs(ref64).max()), 1e-12))
                if rel > self.max_rel_error:
                    found.append(f"output {name!r}: relative error {rel:.3g} > {self.max_rel_error:g}")
            if self.min_top1 is not None and ref.ndim >= 2 and ref.shape[-1] > 1:
                agree = top1_agreement(ref64, new64)
                if agree < self.min_top1:
                    found.append(f"output {name!r}: top-1 agreement {agree:.3f} < {self.min_top1:g}")
        return found


def top1_agreement(want: np.ndarray, got: np.ndarray) -> float:
    """The share of rows whose arg-max over the last axis is the same in both."""
    return float((np.argmax(want, axis=-1) == np.argmax(got, axis=-1)).mean())
