"""How the demo prints the monitor's view: drift, accuracy (realized and estimated), bias, alerts."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from slipstream.cli.output import console


def _firing(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in snapshot.get("alerts", []) if a.get("state") == "firing"]


def render_monitoring(before: dict[str, Any], after: dict[str, Any], final: dict[str, Any]) -> None:
    """The monitor after the normal traffic, after the shift and its labels, and at the end (attacks too)."""
    table = Table(title="the monitor, before and after the shift")
    for col in ("", "after normal traffic", "after drifted traffic + labels"):
        table.add_column(col)

    def drift(s: dict[str, Any]) -> str:
        d = s.get("drift") or {}
        if not d.get("judged"):
            return "not judged yet"
        return f"{len(d.get('drifted_features', []))} of 64 pixels drifted ({d.get('method', '?')})"

    def quality(s: dict[str, Any]) -> str:
        q = s.get("quality") or {}
        realized = (q.get("realized") or {}).get("accuracy")
        estimated = q.get("estimated_accuracy")
        parts = [f"estimated {estimated:.3f}" if estimated is not None else "no estimate"]
        parts.append(f"realized {realized:.3f}" if realized is not None else "no labels yet")
        return ", ".join(parts)

    def alerts(s: dict[str, Any]) -> str:
        names = [a["rule"] for a in _firing(s)]
        return ", ".join(names) if names else "none"

    table.add_row("requests observed", str(before.get("requests")), str(after.get("requests")))
    table.add_row("input drift", escape(drift(before)), escape(drift(after)))
    table.add_row("accuracy", escape(quality(before)), escape(quality(after)))
    table.add_row("alerts firing", escape(alerts(before)), escape(alerts(after)))
    console.print(table)
    console.print("alerts firing at the end, and why:")
    for alert in _firing(final):
        console.print(f"  [red]{escape(alert['rule'])}[/]: {escape(alert['reason'])}", highlight=False)
    store = final.get("store") or {}
    console.print(f"prediction log: {escape(str(store))}", highlight=False)
