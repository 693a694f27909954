"""Confidence intervals for proportions, their differences and their ratios (numpy arrays in, arrays out).

Chosen for calibration at small counts and rare events, where the Wald interval fails: Wilson's score interval
for one proportion; Newcombe's hybrid score interval (1998, method 10) for a difference, built from the two
Wilson intervals; for a ratio, MOVER-R (Donner & Zou) from the same Wilson bounds, or Katz's log interval.
Vectorized so that a calibration benchmark can run many windows at once; :mod:`slipstream.monitor.fairness`
applies them to every pair of groups.
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def wilson_interval(x: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for x successes of n (n > 0)."""
    x, n = np.asarray(x, dtype=np.float64), np.asarray(n, dtype=np.float64)
    z2 = z * z
    center = (x + z2 / 2) / (n + z2)
    half = z / (n + z2) * np.sqrt(x * (n - x) / n + z2 / 4)
    return np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)


def newcombe_interval(
    x1: np.ndarray, n1: np.ndarray, x2: np.ndarray, n2: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval (1998, method 10) for p1 − p2."""
    p1, p2 = np.asarray(x1, np.float64) / n1, np.asarray(x2, np.float64) / n2
    l1, u1 = wilson_interval(x1, n1, z)
    l2, u2 = wilson_interval(x2, n2, z)
    d = p1 - p2
    return d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def ratio_interval(
    x1: np.ndarray,
    n1: np.ndarray,
    x2: np.ndarray,
    n2: np.ndarray,
    z: float,
    method: Literal["mover-r", "katz-log"] = "mover-r",
) -> tuple[np.ndarray, np.ndarray]:
    """Interval for p1 / p2; the upper bound is +inf where x2 == 0 (MOVER-R) or both counts are 0 (Katz, which
    adds 0.5 to every cell of a table with a zero count).

    MOVER-R: the lower limit L solves lower(p1 − L·p2) = 0 with MOVER-D on the Wilson bounds, a quadratic
    whose relevant root is taken in closed form (it stays valid when Wilson's upper bound exceeds 2·p2)."""
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    n1, n2 = np.asarray(n1, np.float64), np.asarray(n2, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "katz-log":
            zero = (x1 == 0) | (x2 == 0)
            a, b = np.where(zero, x1 + 0.5, x1), np.where(zero, x2 + 0.5, x2)
            m1, m2 = np.where(zero, n1 + 1, n1), np.where(zero, n2 + 1, n2)
            log_r = np.log((a / m1) / (b / m2))
            se = np.sqrt(1 / a - 1 / m1 + 1 / b - 1 / m2)
            low, high = np.exp(log_r - z * se), np.exp(log_r + z * se)
            both = (x1 == 0) & (x2 == 0)  # 0 / 0: nothing to say
            return np.where(both, 0.0, low), np.where(both, np.inf, high)
        p1, p2 = x1 / n1, x2 / n2
        l1, u1 = wilson_interval(x1, n1, z)
        l2, u2 = wilson_interval(x2, n2, z)
        b = p1 * p2
        a_lo, c_lo = u2 * (2 * p2 - u2), l1 * (2 * p1 - l1)
        a_hi, c_hi = l2 * (2 * p2 - l2), u1 * (2 * p1 - u1)
        # (b − √(b² − ac)) / a, rationalized: stable where a is near 0, and valid for a < 0.
        low = np.where(c_lo <= 0, 0.0, c_lo / (b + np.sqrt(np.maximum(b * b - a_lo * c_lo, 0.0))))
        high = np.where(x2 > 0, (b + np.sqrt(np.maximum(b * b - a_hi * c_hi, 0.0))) / a_hi, np.inf)
    return np.maximum(low, 0.0), high
