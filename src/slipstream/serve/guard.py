"""Safe defaults: API keys (stored hashed), per-caller token buckets, body limits, value checks.

Keys come from a file (one per line) or an environment variable (comma-separated), read once into
sha256 digests; the plain keys are not kept. Binding to anything other than loopback without keys
fails at start-up unless anonymous access is asked for explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from slipstream.artifact.tensor import TensorSpec
from slipstream.errors import (
    ConfigError,
    ForbiddenError,
    InputError,
    PayloadTooLargeError,
    RateLimitedError,
    UnauthorizedError,
)
from slipstream.serve.settings import GuardSettings

API_KEYS_ENV = "SLIPSTREAM_API_KEYS"
ADMIN_KEYS_ENV = "SLIPSTREAM_ADMIN_KEYS"
_MAX_BUCKETS = 10_000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def read_keys(file: Path | None, environ: Mapping[str, str], variable: str) -> frozenset[str]:
    """The sha256 digests of the keys in ``file`` and in ``environ[variable]``."""
    keys: list[str] = []
    if file is not None:
        try:
            keys += file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"Cannot read the API key file '{file}': {exc}.", field="api_key_file") from exc
    keys += environ.get(variable, "").split(",")
    return frozenset(hash_key(k) for k in keys if k.strip() and not k.strip().startswith("#"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


def _known(key: str | None, hashes: frozenset[str]) -> str | None:
    if key is None:
        return None
    digest = hash_key(key)
    # Compare against every digest in constant time so timing does not reveal which prefix matched.
    found = False
    for stored in hashes:
        found |= hmac.compare_digest(digest, stored)
    return digest if found else None


class Guard:
    """Authentication, rate limiting and request checks for one server."""

    def __init__(self, settings: GuardSettings, *, host: str, clock: Callable[[], float] = time.monotonic) -> None:
        if not is_loopback(host) and not settings.api_key_hashes and not settings.allow_anonymous:
            raise ConfigError(
                f"Refusing to serve on {host} without API keys: anyone who can reach it could use the models.",
                field="host",
                hint=f"Give keys with --api-key-file or ${API_KEYS_ENV}, bind to 127.0.0.1, "
                "or pass --allow-anonymous to accept the risk.",
            )
        self.settings = settings
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}

    @property
    def auth_required(self) -> bool:
        return bool(self.settings.api_key_hashes)

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]], client: str) -> str:
        """The caller's identity (its key digest, or its address when keys are off). Raises 401."""
        if not self.settings.api_key_hashes:
            return client
        digest = _known(presented_key(headers), self.settings.api_key_hashes)
        if digest is None:
            raise UnauthorizedError(
                "This server needs an API key; none was sent, or it is not one the server knows.",
                hint="Send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
            )
        return digest

    def authorize_admin(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        if not self.settings.admin_key_hashes:
            raise ForbiddenError(
                "The repository endpoints are disabled: no admin key is configured.",
                hint=f"Start the server with --admin-key-file or ${ADMIN_KEYS_ENV}.",
            )
        if _known(presented_key(headers), self.settings.admin_key_hashes) is None:
            raise UnauthorizedError(
                "The repository endpoints need an admin key; none was sent, or it is not an admin key.",
                hint="Send it as 'Authorization: Bearer KEY'.",
            )

    def rate_limit(self, caller: str) -> None:
        """Take one token from ``caller``'s bucket, or raise 429 with the wait until the next token."""
        rate = self.settings.rate_per_s
        if rate is None:
            return
        now = self._clock()
        burst = float(self.settings.burst)
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._evict_full(now, rate, burst)
            bucket = self._buckets[caller] = [burst, now]
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise RateLimitedError(
                f"Rate limit of {rate:g} requests/s (burst {self.settings.burst}) exceeded.",
                hint="Slow down, or ask for a higher limit.",
                retry_after_s=(1.0 - tokens) / rate,
            )
        bucket[0] = tokens - 1.0

    def _evict_full(self, now: float, rate: float, burst: float) -> None:
        # Callers whose buckets have refilled carry no state worth keeping; this bounds memory.
        self._buckets = {k: b for k, b in self._buckets.items() if b[0] + (now - b[1]) * rate < burst}

    def check_size(self, size: int) -> None:
        limit = self.settings.max_body_bytes
        if size > limit:
            raise PayloadTooLargeError(
                f"The request body is {size} bytes; this server accepts at most {limit}.",
                hint="Send fewer rows per request, or raise --max-body-bytes.",
            )

    def check_values(self, feeds: Mapping[str, np.ndarray], specs: Iterable[TensorSpec]) -> None:
        """NaN/Inf policy and each input's value range; raises a 400 that says where and how many."""
        for spec in specs:
            array = feeds[spec.name]
            if array.dtype.kind not in "fiu" or array.size == 0:
                continue
            if array.dtype.kind == "f" and self.settings.non_finite == "reject":
                finite = np.isfinite(array)
                if not finite.all():
                    bad = int(array.size - np.count_nonzero(finite))
                    raise InputError(
                        f"Input '{spec.name}' holds {bad} NaN or Inf value(s); this server rejects them.",
                        input_name=spec.name,
                        hint="Clean the data, or start the server with --non-finite allow.",
                    )
            if spec.value_range is not None:
                low, high = spec.value_range
                lo, hi = float(array.min()), float(array.max())
                if lo < low or hi > high or math.isnan(lo) or math.isnan(hi):
                    raise InputError(
                        f"Input '{spec.name}' must lie in [{low:g}, {high:g}]; got values in [{lo:g}, {hi:g}].",
                        input_name=spec.name,
                        hint="Scale the data the way the model was trained.",
                    )
