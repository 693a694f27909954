"""Where the prediction log lives: a SQLite file or a PostgreSQL database, told apart once, here.

``--monitor-db`` and ``monitor ... --db`` take one string. A plain path is a SQLite file; a
``postgresql://`` or ``postgres://`` URL is the shared log of a fleet; any other ``scheme://`` is refused
(it used to be taken as a path, making a directory named ``postgresql:``). A password never comes on the
command line, where ``ps`` and shell history show it: it comes from ``PGPASSWORD`` or ``PGPASSFILE``, which
libpq reads itself. TLS settings (``sslmode``, ``sslrootcert``, ...) pass through in the URL's query.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from slipstream.errors import ConfigError

POSTGRES_SCHEMES = ("postgresql", "postgres")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(text: str) -> bool:
    """True for ``scheme://...`` (a Windows drive letter ``C:\\`` has no ``//``)."""
    return _SCHEME.match(text) is not None


def parse_location(text: str | Path, *, field: str = "store.path") -> Path | str:
    """A SQLite file's path, or a PostgreSQL URL checked to carry no password; ConfigError otherwise."""
    if isinstance(text, Path):
        return text
    match = _SCHEME.match(text)
    if match is None:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            f"The prediction log's location '{redact(text)}' is a URL with the scheme '{scheme}://'; "
            "expected a file path (SQLite) or a postgresql:// URL.",
            field=field,
            hint="Give a file path such as monitor.db, or postgresql://user@host:5432/dbname.",
        )
    parts = urlsplit(text)
    if parts.password is not None:
        raise ConfigError(
            f"The database URL '{redact(text)}' carries a password; a password on the command line or in a "
            "settings file is visible to every process list and shell history.",
            field=field,
            hint="Remove it from the URL and set PGPASSWORD, or put it in a file named by PGPASSFILE (~/.pgpass).",
        )
    return text


def redact(text: str) -> str:
    """``text`` with any password in a URL replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", text)
