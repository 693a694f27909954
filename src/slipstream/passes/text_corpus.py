"""Unlabeled text already on this machine, for label-free distillation and importance scores.

Distilling a slimmed text encoder from its original needs sentences, not labels. Any prose will do, and
every Python environment carries plenty: the README each installed package ships as its METADATA
description, and the docstrings of the standard library. Nothing is downloaded. The corpus is
deterministic for a given environment: packages and files are read in sorted order, paragraphs are cleaned
of markup and de-duplicated, and :func:`side` puts each paragraph in "train" or "heldout" by its digest, so a
text is on the same side on every run. ``chunks="sentences"`` cuts the paragraphs into sentences (a
sentence encoder is mostly asked about sentences: shorter, and closer to what it is evaluated on); a
sentence stays on its paragraph's side, so the two sides share no paragraph.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

# Paragraph sizes kept: shorter pieces are headings and badges, longer ones are tables or code.
MIN_CHARS = 40
MAX_CHARS = 600
HELDOUT_PERCENT = 10
MIN_SENTENCE_WORDS = 4
Side = Literal["train", "heldout"]
Chunks = Literal["paragraphs", "sentences"]

_CODE_FENCE = re.compile(r"```.*?```|~~~.*?~~~", re.DOTALL)
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # markdown links and images: keep the label
_RST_ROLE = re.compile(r":[a-z:]+:`([^`]*)`")
_MARKUP = re.compile(r"[`*_#>|=]+|\.\. [a-z-]+::.*")
_URL = re.compile(r"<?https?://[^\s>]*>?|<[^<>\s]*>")
_CODE_CHARS = frozenset('(){}[]"=<>;/\\')
_SPACE = re.compile(r"\s+")
# A sentence ends at . ! or ? followed by a space and a capital (or an opening quote or bracket), unless the
# word before is a common abbreviation.
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<!\bvs\.)(?<=[.!?])\s+(?=[A-Z\"'(])")


def clean(paragraph: str) -> str | None:
    """One paragraph as plain prose, or None when it is not prose (code, a table, a list of links)."""
    text = _URL.sub("", _RST_ROLE.sub(r"\1", _LINK.sub(r"\1", paragraph)))
    text = _SPACE.sub(" ", _MARKUP.sub(" ", text)).strip()
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    code = sum(c in _CODE_CHARS for c in text)
    if letters < 0.85 * len(text) or code > 0.01 * len(text) or len(text.split()) < 6:
        return None  # code, version tables, paths
    return text


def _paragraphs(body: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", _CODE_FENCE.sub("\n\n", body)):
        if block.lstrip().startswith(("    ", "\t", ">>>", "$ ", "pip ", "import ", "from ")):
            continue  # indented code blocks and shell or Python examples
        if (text := clean(block)) is not None:
            yield text


def package_readmes() -> Iterator[str]:
    """Paragraphs of every installed distribution's long description, in name order."""
    dists = sorted(
        importlib.metadata.distributions(), key=lambda d: (str(d.metadata["Name"] or "").lower(), d.version or "")
    )
    for dist in dists:
        meta = dist.metadata
        body = meta.get("Description") or meta.get_payload() or ""  # type: ignore[attr-defined]
        yield from _paragraphs(str(body))


def sentences(paragraph: str) -> list[str]:
    """``paragraph`` cut into sentences of at least MIN_SENTENCE_WORDS words (shorter pieces are dropped)."""
    return [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= MIN_SENTENCE_WORDS]


_SKIPPED_STDLIB = ("test", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "tkinter")


def stdlib_docstrings(limit_files: int = 800) -> Iterator[str]:
    """Module, class and function docstrings of the standard library (its modules, then its packages'), read
    with ``ast`` (nothing imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    nested = (p for p in root.glob("*/*.py") if p.parent.name not in _SKIPPED_STDLIB)
    files = [*sorted(root.glob("*.py")), *sorted(nested)][:limit_files]
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this interpreter cannot parse says nothing about the corpus
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield from _paragraphs(doc)


def side(text: str) -> Side:
    """Which side of the split ``text`` is on: one in ten texts, by digest, is held out."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def unlabeled_text(limit: int = 2000, *, split: Side = "train", chunks: Chunks = "paragraphs") -> list[str]:
    """Up to ``limit`` distinct paragraphs (or sentences) from one side of the split: package READMEs first,
    then docstrings."""
    seen: set[str] = set()
    out: list[str] = []
    for source in (package_readmes(), stdlib_docstrings()):
        for paragraph in source:
            if side(paragraph) != split:
                continue
            for text in [paragraph] if chunks == "paragraphs" else sentences(paragraph):
                if text in seen:
                    continue
                seen.add(text)
                out.append(text)
                if len(out) >= limit:
                    return out
    return out
