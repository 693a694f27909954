from __future__ import annotations

import slipstream

EXPECTED = [
    "BenchReport",
    "BenchSettings",
    "Bundle",
    "BundleSummary",
    "Engine",
    "Manifest",
    "SlipstreamError",
    "Target",
    "TensorSpec",
    "__version__",
    "bench",
    "convert",
    "optimize",
    "summarize",
    "target",
]


def test_all_is_sorted_and_curated() -> None:
    assert slipstream.__all__ == sorted(slipstream.__all__)
    assert slipstream.__all__ == EXPECTED


def test_every_exported_name_exists() -> None:
    for name in slipstream.__all__:
        assert hasattr(slipstream, name), name


def test_public_callables_are_documented() -> None:
    for name in slipstream.__all__:
        obj = getattr(slipstream, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"
