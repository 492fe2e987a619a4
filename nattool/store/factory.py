"""Turn a ``--store`` value into a store (not yet opened: call ``await store.open()``)."""

from __future__ import annotations

from urllib.parse import urlsplit

from nattool.errors import UsageError
from nattool.store.base import Store, StoreLimits

STORE_FORMS = (
    "memory",
    "sqlite:PATH (or 'sqlite:' for the default path)",
    "redis://HOST:PORT/DB",
    "rediss://HOST:PORT/DB (TLS)",
    "valkey://HOST:PORT/DB",
    "valkeys://HOST:PORT/DB (TLS)",
)

DEFAULT_STORE_SPEC = "sqlite:"

# Valkey speaks the Redis protocol; the redis client only knows the redis schemes.
_REDIS_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}


def _bad(spec: str, why: str) -> UsageError:
    forms = ", ".join(STORE_FORMS)
    return UsageError(f"bad --store {spec!r}: {why}; use one of: {forms}")


def open_store(spec: str, limits: StoreLimits, *, shared: bool = False) -> Store:
    """Build the store named by ``spec``. Raises UsageError on a bad spec.

    ``shared``: the store is used by several worker processes at once (serve
    --workers); the memory store cannot be.
    """
    text = spec.strip()
    if not text:
        raise _bad(spec, "empty")
    if text == "memory":
        if shared:
            raise UsageError("--workers needs a store the workers can share: sqlite:PATH or redis://...; "
                             "the memory store lives in one process")
        from nattool.store.memory import MemoryStore

        return MemoryStore(limits)
    if text == "sqlite" or text.startswith("sqlite:"):
        from nattool.store.sqlite import LoneSqliteStore, SharedSqliteStore, default_sqlite_path

        path = text[len("sqlite:") :] if text.startswith("sqlite:") else ""
        # Accept the URL-ish spelling sqlite:///abs/path too.
        if path.startswith("//"):
            path = path[2:]
        return (SharedSqliteStore if shared else LoneSqliteStore)(limits, path or default_sqlite_path())
    scheme, sep, _ = text.partition("://")
    if sep and scheme.lower() in _REDIS_SCHEMES:
        url = _REDIS_SCHEMES[scheme.lower()] + "://" + text[len(scheme) + 3 :]
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - reading it validates the port (ValueError)
            db = parts.path.strip("/")
        except ValueError as exc:
            raise _bad(spec, str(exc)) from None
        if not parts.hostname:
            raise _bad(spec, "no host")
        if db and not db.isdigit():
            raise _bad(spec, f"database {db!r} is not a number")
        try:
            from nattool.store.redis import RedisStore
        except ImportError as exc:
            if exc.name is None or exc.name.partition(".")[0] != "redis":
                raise
            raise UsageError(f"--store {scheme}:// needs the redis package: pip install 'nattool[redis]'") from None
        return RedisStore(limits, url)
    raise _bad(spec, "unknown kind")


__all__ = ["DEFAULT_STORE_SPEC", "STORE_FORMS", "open_store"]
