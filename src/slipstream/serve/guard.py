"""Safe defaults: API keys (stored as salted HMACs), per-caller token buckets, body limits (the tensors' own
checks are the signature check, ``serve/signature.py``).

Keys come from a file (one per line) or an environment variable (comma-separated), read once into salted
HMAC-SHA256 digests (``hash_key``); the plain keys are not kept, and a leaked settings dump cannot be
looked up in a table of common keys. A key is taken exactly as written: at least 16 characters, no
surrounding whitespace (an error, not trimmed), and a request presents one key, once. Binding to anything
other than loopback without keys fails at start-up unless anonymous access is asked for explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from slipstream.errors import (
    ConfigError,
    ForbiddenError,
    PayloadTooLargeError,
    ProtocolError,
    RateLimitedError,
    UnauthorizedError,
)
from slipstream.serve.settings import GuardSettings

API_KEYS_ENV = "SLIPSTREAM_API_KEYS"
ADMIN_KEYS_ENV = "SLIPSTREAM_ADMIN_KEYS"
MIN_KEY_CHARS = 16
_SCHEME = "hmac-sha256"
_MAX_BUCKETS = 10_000


def check_key(key: str, where: str = "An API key") -> None:
    """Refuse a key that is short or carries surrounding whitespace (it would be sent without it)."""
    if key != key.strip():
        raise ConfigError(
            f"{where} has whitespace around it; keys are taken exactly, so it would never match.",
            field="api_key_file",
            hint="Remove the spaces or tabs around the key (one key per line, nothing else on the line).",
        )
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(
            f"{where} has {len(key)} characters; keys need at least {MIN_KEY_CHARS}, so they cannot be guessed.",
            field="api_key_file",
            hint="Make a longer random key, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.",
        )


def _digest(key: bytes, salt: bytes) -> str:
    return hmac.new(salt, key, hashlib.sha256).hexdigest()


def hash_key(key: str, *, salt: bytes | None = None) -> str:
    """``hmac-sha256$<salt>$<digest>`` of ``key`` under a random 16-byte salt (refuses a weak key)."""
    check_key(key)
    salt = os.urandom(16) if salt is None else salt
    return f"{_SCHEME}${salt.hex()}${_digest(key.encode(), salt)}"


def _parse(stored: str) -> tuple[bytes, str]:
    scheme, _, rest = stored.partition("$")
    salt_hex, _, digest = rest.partition("$")
    try:
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        salt = b""
    if scheme != _SCHEME or not salt or len(digest) != 64:
        raise ConfigError(
            f"A stored key hash is not a salted '{_SCHEME}' hash (it starts {stored[:12]!r}).",
            field="api_key_hashes",
            hint="Hash keys with slipstream.serve.guard.hash_key (plain sha256 digests are no longer accepted).",
        )
    return salt, digest


def read_keys(file: Path | None, environ: Mapping[str, str], variable: str) -> frozenset[str]:
    """The salted hashes of the keys in ``file`` (one a line; '#' starts a comment line) and ``environ[variable]``."""
    keys: list[tuple[str, str]] = []
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8-sig").splitlines()  # the line ending is not part of a key
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"Cannot read the API key file '{file}': {exc}.",
                field="api_key_file",
                hint="Give a readable UTF-8 text file with one key per line.",
            ) from exc
        keys += [(line, f"Line {n} of '{file}'") for n, line in enumerate(lines, 1) if not _blank(line)]
    value = environ.get(variable, "")
    if value:
        keys += [(k, f"Key {n} of ${variable}") for n, k in enumerate(value.split(","), 1) if k]
    # One salt for this server's keys: a request then costs one HMAC however many keys there are.
    salt = os.urandom(16)
    return frozenset(_hash_checked(key, where, salt) for key, where in keys)


def _blank(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _hash_checked(key: str, where: str, salt: bytes) -> str:
    check_key(key, where)
    return hash_key(key, salt=salt)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, exactly; two keys (a repeated header, or a Bearer and an X-API-Key that
    differ) are a 400: which one the server picked would otherwise depend on header order."""
    bearer: list[bytes] = []
    api: list[bytes] = []
    for name, value in headers:
        if name == b"authorization":
            bearer.append(value)
        elif name == b"x-api-key":
            api.append(value)
    if len(bearer) > 1 or len(api) > 1:
        raise ProtocolError(
            f"The request carries {len(bearer)} Authorization and {len(api)} X-API-Key headers; send one key once.",
            hint="Send the key as 'Authorization: Bearer KEY' or as 'X-API-Key: KEY'.",
        )
    keys = [v[7:] for v in bearer if v[:7].lower() == b"bearer "] + api
    if len(keys) == 2 and not hmac.compare_digest(keys[0], keys[1]):
        raise ProtocolError(
            "The Authorization and X-API-Key headers carry different keys; the server will not pick one.",
            hint="Send one key, in one of the two headers.",
        )
    return keys[0] if keys else None


def _known(key: bytes | None, hashes: tuple[tuple[bytes, str], ...]) -> str | None:
    """The stored digest ``key`` matches, or None; every stored hash is tried, so the time spent does not
    say which one (or whether any) matched."""
    if key is None:
        return None
    found: str | None = None
    computed: dict[bytes, str] = {}
    for salt, digest in hashes:
        mine = computed.get(salt)
        if mine is None:
            mine = computed[salt] = _digest(key, salt)
        if hmac.compare_digest(mine, digest):
            found = digest
    return found


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
        # Parsed once: a malformed hash fails here, at start-up, not on the first request.
        self._api_keys = tuple(_parse(h) for h in sorted(settings.api_key_hashes))
        self._admin_keys = tuple(_parse(h) for h in sorted(settings.admin_key_hashes))
        self.settings = settings
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}

    @property
    def auth_required(self) -> bool:
        return bool(self.settings.api_key_hashes)

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]], client: str) -> str:
        """The caller's identity (its key's stored digest, or its address when keys are off). Raises 401."""
        if not self.settings.api_key_hashes:
            return client
        digest = _known(presented_key(headers), self._api_keys)
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
        if _known(presented_key(headers), self._admin_keys) is None:
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
