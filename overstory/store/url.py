"""One setting picks the store: a URL.

* ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` — the embedded default
  (stdlib sqlite3, WAL mode); for one machine.
* ``mongodb://host:port/dbname`` or ``mongodb+srv://...`` — PyMongo's async client; for a
  cluster of several nodes. The database defaults to ``overstory``.

Parsing only: :func:`overstory.store.open_store` (:mod:`.factory`) opens one.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from ..exceptions import StoreURLError

__all__ = ["redact_url", "resolve_store_url"]

_MONGO_SCHEMES = ("mongodb", "mongodb+srv")
_DB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def resolve_store_url(url: object) -> str:
    """Validate a store URL and make a SQLite path absolute (actors run elsewhere).

    Raises :class:`StoreURLError` naming what is wrong.
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreURLError(f"store URL must be a non-empty string, got {url!r}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreURLError(
            f"store URL {redact_url(url)!r} has no scheme; use 'sqlite:///path/to/file.db' "
            "or 'mongodb://host:port/dbname'"
        )
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise StoreURLError(
                f"SQLite URL {url!r} needs three slashes: 'sqlite:///relative.db' or "
                "'sqlite:////absolute/path.db'"
            )
        path = rest[1:]
        if not path or path == ":memory:":
            raise StoreURLError(
                f"SQLite URL {url!r} names no file; an in-memory database cannot be shared "
                "by conversation actors"
            )
        if path.endswith("/"):
            raise StoreURLError(f"SQLite URL {url!r} names a directory, not a file")
        return "sqlite:///" + os.path.abspath(path)
    if scheme in _MONGO_SCHEMES:
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError as exc:
            raise StoreURLError(f"MongoDB URL {redact_url(url)!r} is malformed: {exc}") from exc
        if not parts.hostname:
            raise StoreURLError(f"MongoDB URL {redact_url(url)!r} names no host")
        db = parts.path.lstrip("/")
        if db and not _DB_NAME.match(db):
            raise StoreURLError(
                f"MongoDB database name {db!r} in {redact_url(url)!r} must be 1-63 letters, "
                "digits, '_' or '-'"
            )
        return url
    raise StoreURLError(
        f"unsupported store scheme {scheme!r} in {redact_url(url)!r}; "
        "use 'sqlite:///...' or 'mongodb://...'"
    )
