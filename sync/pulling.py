"""Pulling: other hosts' entries from the server, merged through the local WAL.

Other origins' entries after the pull cursor (a server position drawn in commit
order), merged through the local WAL as merge records, which are durable and
replayed like local writes but never shipped back. The cursor moves in the same
record as the merged data; a page holding only this node's own entries moves a
"skipped" cursor instead, which need not be durable (re-reading those pages after
a crash returns nothing). See PROTOCOL.md on the cursor.

Scope (sync/scope.py): each page is read by the store's scope, and the fills a
widening or a re-bootstrap leaves are run before and after the pages. Between pages
(and fill pages) the store's own commits a ``remote`` commit waits for are shipped
first (``between_pages``): a backlog pull never delays a ``remote`` commit's
acknowledgement by more than one page. Other commits wait for the next ship: a pull
pushes nothing nobody waits for.

Threads: the shipping thread (the replicator's, or the caller's in ``run_once``);
``cursor`` from any thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from walsync.engine.errors import PullCompactedError, RemoteUnavailableError

from .link import Link
from .scope import ScopeKeeper
from .shipping import MAX_RECLAIMS

__all__ = ["Puller"]


class Puller:
    """Merges a server's pages of other hosts' entries into the link's store."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.store = link.store
        self.transport = link.transport
        self.options = link.options
        self._skipped_cursor: int | None = None
        #: pull rounds completed; read by the replicator's stats()
        self.pulls = 0
        link.on_server_changed = self.reset_cursor
        self.scope = ScopeKeeper(link.store, link.transport)
        #: re-bootstraps after the server compacted its log past the cursor
        self.rebootstraps = 0
        #: called between pages while a 'remote' commit of the store waits for the
        #: server (the replicator ships then)
        self.between_pages: Callable[[], object] | None = None

    def _yield_to_commits(self) -> None:
        """Between two pages: ship first what the store's 'remote' commits wait for
        (only then: a pull that shipped every commit would push at its own moments)."""
        link = self._link
        waited = link.awaited > link.acked or bool(link.awaited_elsewhere and link.unacked)
        if waited and self.between_pages is not None:
            self.between_pages()

    def _fill(self) -> int:
        filled = self.scope.fill(self._yield_to_commits)
        self._link.status.pulled_entries += filled
        return filled

    def pull(self) -> int:
        """Merge other origins' entries after the cursor; returns how many were received."""
        store = self.store
        link = self._link
        status = link.status
        link.ensure_connected()
        total = self._fill()
        reclaims = 0
        while True:
            cursor = self.cursor()
            try:
                page = self.scope.pull(cursor, self.options.pull_limit)
            except PullCompactedError:
                # The log no longer holds everything after the cursor: fill the scope in
                # from the server's state up to its head, and pull on from there.
                head = self.transport.head()
                self.scope.rebootstrap(cursor, head)
                store.apply_remote([], pull_cursor=head)
                self.rebootstraps += 1
                status.extra["rebootstraps"] = self.rebootstraps
                total += self._fill()
                continue
            status.server_head = page.head
            status.last_pull_at = time.time()
            self.scope.note_page(page, cursor)  # a widening: its fills, before the merge
            if page.next <= cursor:
                break
            if not page.entries:
                # Only this node's own entries were passed over: re-reading them
                # after a crash returns nothing, so the cursor need not be durable.
                self._skipped_cursor = page.next
                store.sync_ledger.set_skipped_pull_cursor(page.next)
                if page.next >= page.head:
                    break
                continue
            items = page.siblings  # checked by the transport: no malformed entry here
            mine = store.node_id
            if (any(s.version.vv.get(mine, 0) > link.acked for _, s in items)
                    and not link.still_claimed()):
                # Versions that saw writes of this node id this store never pushed:
                # another store holds the id now (a copy). Merged, they would wrongly
                # dominate this store's own unshipped writes: claim again (a fresh id)
                # first, then read the page again.
                reclaims += 1
                if reclaims > MAX_RECLAIMS:
                    raise RemoteUnavailableError(
                        f"pulling into {store.path}: node id {mine} keeps being claimed "
                        "by another store")
                link.server_checked = False
                link.ensure_connected()
                continue
            store.apply_remote(items, pull_cursor=page.next)
            total += len(items)
            status.pulled_entries += len(items)
            status.conflicts += sum(
                1 for key in {k for k, _ in items} if len(store.get_versions(key)) > 1
            )
            if page.next >= page.head:
                break
            self._yield_to_commits()
        total += self._fill()
        status.pull_cursor = self.cursor()
        self.pulls += 1
        return total

    def cursor(self) -> int:
        """The merged cursor (moved with merged data), or further if only own entries followed."""
        ledger = self.store.sync_ledger
        durable = ledger.pull_cursor
        if self._skipped_cursor is None:
            self._skipped_cursor = ledger.skipped_pull_cursor or 0
        return max(durable, self._skipped_cursor)

    def reset_cursor(self) -> None:
        """Pull everything again: the server's positions are not the ones counted."""
        self.scope.forget_positions()
        if self.cursor() == 0:
            return
        self._skipped_cursor = 0
        self.store.sync_ledger.set_skipped_pull_cursor(0)
        self.store.apply_remote([], pull_cursor=0)
