from __future__ import annotations

import subprocess
import sys

import slipstream.monitor as monitor


def test_monitor_import_stays_light_and_points_along_the_flow() -> None:
    code = (
        "import sys, slipstream; before = set(sys.modules); import slipstream.monitor; "
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "('scipy', 'pandas', 'sklearn', 'torch', 'tensorflow', 'evidently', 'nannyml') "
        "or m.startswith(('slipstream.passes', 'slipstream.importers'))); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_are_sorted_and_exist() -> None:
    assert monitor.__all__ == sorted(monitor.__all__)
    assert all(hasattr(monitor, name) for name in monitor.__all__)
