"""Storage, chosen by config: SQLite (`database`, or `url = "sqlite:///..."`), the embedded
default, or PostgreSQL (`url = "postgresql://..."`) for several nodes on one database."""

from __future__ import annotations

from clickrelay.config import StorageSettings
from clickrelay.storage.base import Store, StoreError
from clickrelay.storage.postgres import open_postgres
from clickrelay.storage.sqlite import open_sqlite

__all__ = ["PasswordFileError", "Store", "StoreError", "open_store"]


class PasswordFileError(StoreError):
    """`password_file` cannot be read (a config mistake, unlike the database being down)."""


async def open_store(settings: StorageSettings) -> Store:
    """The configured store, open and migrated. Raises StoreError if it cannot be opened."""
    path = settings.sqlite_path
    if path is not None:
        return await open_sqlite(path, settings.synchronous)
    assert settings.url is not None
    return await open_postgres(settings.url.url, _read_password(settings), settings.pool_size)


def _read_password(settings: StorageSettings) -> str | None:
    """The database password from `password_file` (its trailing newline stripped), if set."""
    if settings.password_file is None:
        return None
    try:
        text = settings.password_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PasswordFileError(f"cannot read {settings.password_file}: {exc}") from None
    return text.rstrip("\r\n")
