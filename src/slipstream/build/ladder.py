"""The `auto` candidate ladder: the standard things to try, in order of risk."""

from __future__ import annotations

from slipstream.build.recipe import Candidate, Recipe


def auto_candidates(recipe: Recipe, calibration: str) -> tuple[Candidate, ...]:
    """fp32 optimized, fp16, dynamic int8, then static int8 with each calibration method.

    Dynamic int8 is tried on every graph: on Conv-heavy models it is measured and rejected as slower
    (ConvInteger is several times slower than fp32 here), which the report then shows with its reason.
    ``calibration`` is an .npz of real inputs that the build wrote from the recipe's calibration data.
    """
    ladder = [
        Candidate(name="fp32-optimized", passes=("graph.optimize",)),
        Candidate(name="fp16", passes=("precision.fp16",)),
        Candidate(name="int8-dynamic", passes=({"quantize.dynamic": {"per_channel": True}},)),
    ]
    for method in ("minmax", "entropy", "percentile"):
        options = {"calibration": method, "data": calibration, "per_channel": True}
        ladder.append(Candidate(name=f"int8-static-{method}", passes=({"quantize.static": options},)))
    return tuple(ladder)
