"""Headless Chromium (Debian's package) driven by Playwright, for tests that look at rendered pages."""

from __future__ import annotations

import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("Chromium is not installed: run `make browser` (Debian: apt-get install chromium).")
    return path


def screenshot(url: str, out: Path, *, selector: str | None = None, width: int = 1280) -> dict[str, object]:
    """Load ``url``, save a full-page PNG to ``out`` and return facts about the page for assertions."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(url)
            if selector is not None:
                page.wait_for_selector(selector)
            page.screenshot(path=str(out), full_page=True)
            facts: dict[str, object] = page.evaluate(
                """() => ({
                    title: document.title,
                    svgs: Array.from(document.querySelectorAll('svg')).map(s => {
                        const r = s.getBoundingClientRect(); return {w: r.width, h: r.height,
                        points: s.querySelectorAll('circle').length};
                    }),
                    tableRows: document.querySelectorAll('table#candidates tr').length,
                    text: document.body.innerText,
                })"""
            )
        finally:
            browser.close()
    return facts
