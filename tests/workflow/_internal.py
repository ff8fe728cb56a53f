"""Writes around the workflow layer into the reserved namespace, for tests that leave a
run's keys as a crash, a pull or a foreign program could have left them."""

from __future__ import annotations

from typing import Any

from walsync.engine import Delete, Put, Store


def put_internal(store: Store, key: str, value: Any, *, fence: int = 0) -> None:
    """``store.put`` through the internal door (the key is in the reserved namespace)."""
    store.commit([Put(key, value, fence=fence)], internal=True)


def delete_internal(store: Store, key: str) -> None:
    store.commit([Delete(key)], internal=True)
