"""The one base of every typed config and result: frozen (hashable, safe to share between threads) and strict
(an unknown field is an error that names it, never silently ignored)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
