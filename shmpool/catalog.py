"""The catalog: what a pool holds, who uses it, and what garbage collection may free.

A SQLite database in the pool's metadata tmpfs, shared by every process (later: every daemon) that
attaches the pool. Every change is one `BEGIN IMMEDIATE` transaction, so concurrent writers
serialise and a crash mid-change leaves the previous state.

- An *object* is one segment with a name, a kind ("blob", later "template", "tensor") and its
  per-chunk checksums. Its state goes `writing -> published -> deleted`; only published objects
  can be looked up by name, so a reader never sees a half-written segment.
- A *holder* is a process using the pool (host, pid, start time) with a lease that it renews. A
  holder whose lease ran out, or whose process is gone on this host, is dead.
- A *need* ties an object to another it cannot live without (a layered template to its parent,
  whose pages it maps). A needed object cannot be deleted while a published object needs it,
  and is not freed while any object that needs it still exists.
- A *ref* ties an object to a holder. Pinned refs (a published template the registry keeps)
  outlive their holder; unpinned ones (an open reader, an instance mapping the segment) die
  with it. Garbage collection frees objects with no refs, storage no row points at, and what
  dead writers left half-written.
"""

from __future__ import annotations

import builtins
import json
import socket
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from shmpool.errors import PoolError, SegmentExists, SegmentInUse, SegmentNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('writing', 'published', 'deleted')),
    storage_key TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    sums BLOB,
    meta TEXT NOT NULL DEFAULT '{}',
    writer TEXT NOT NULL,
    created REAL NOT NULL,
    published REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS objects_live_name ON objects(name) WHERE state != 'deleted';
CREATE TABLE IF NOT EXISTS holders (
    holder TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    lease_until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS needs (
    object INTEGER NOT NULL REFERENCES objects(id),
    needed INTEGER NOT NULL REFERENCES objects(id),
    PRIMARY KEY (object, needed)
);
CREATE TABLE IF NOT EXISTS refs (
    object INTEGER NOT NULL REFERENCES objects(id),
    holder TEXT NOT NULL,
    pinned INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (object, holder, pinned)
);
"""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), psutil.Process().pid, psutil.Process().create_time())

    @property
    def id(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.2f}"

    @property
    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_gone(self) -> bool:
        """True when we can tell, on this host, that the process no longer exists."""
        if not self.is_local:
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > 0.01
        except psutil.NoSuchProcess:
            return True


@dataclass(frozen=True)
class ObjectRecord:
    id: int
    name: str
    kind: str
    state: str
    storage_key: str
    size: int
    chunk_size: int
    sums: tuple[int, ...]
    meta: dict[str, Any]
    writer: str
    created: float
    published: float | None
    refs: int = 0
    pins: int = 0


@dataclass(frozen=True)
class GcReport:
    holders_expired: int = 0
    abandoned_writes: int = 0
    objects_freed: int = 0
    orphans_removed: int = 0
    bytes_freed: int = 0


def _pack_sums(sums: list[int]) -> bytes:
    return array("I", sums).tobytes()


def _unpack_sums(blob: bytes | None) -> tuple[int, ...]:
    out = array("I")
    if blob:
        out.frombytes(blob)
    return tuple(out)


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection per attachment, shared by the process's threads: serialise its use.
        self._lock = threading.RLock()
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA journal_size_limit=1048576")  # the WAL lives in RAM: keep it small
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # -- holders --------------------------------------------------------------------------------
    def renew(self, holder: Holder, ttl: float) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO holders VALUES (?, ?, ?, ?, ?) ON CONFLICT(holder) DO UPDATE SET lease_until = ?",
                (holder.id, holder.host, holder.pid, holder.started, time.time() + ttl, time.time() + ttl),
            )

    # -- objects --------------------------------------------------------------------------------
    def begin_write(self, name: str, kind: str, storage_key: str, size: int, chunk_size: int, holder: Holder) -> int:
        try:
            with self.tx() as db:
                cur = db.execute(
                    "INSERT INTO objects (name, kind, state, storage_key, size, chunk_size, writer, created)"
                    " VALUES (?, ?, 'writing', ?, ?, ?, ?, ?)",
                    (name, kind, storage_key, size, chunk_size, holder.id, time.time()),
                )
                return int(cur.lastrowid or 0)
        except sqlite3.IntegrityError as e:
            raise SegmentExists(f"a segment named {name!r} already exists (or is being written)") from e

    def finish_write(
        self,
        object_id: int,
        final_key: str,
        sums: list[int],
        meta: dict[str, Any],
        holder: Holder,
        pin: bool,
        rename: Callable[[], None],
        needs: list[str] | None = None,
    ) -> None:
        """Publish: record checksums and what the object needs, rename the storage and take the
        publisher's ref, atomically."""
        with self.tx() as db:
            for name in needs or []:
                row = db.execute("SELECT id FROM objects WHERE name = ? AND state = 'published'", (name,)).fetchone()
                if row is None:
                    raise SegmentNotFound(f"segment #{object_id} needs {name!r}, which is not published")
                db.execute("INSERT OR IGNORE INTO needs VALUES (?, ?)", (object_id, row[0]))
            cur = db.execute(
                "UPDATE objects SET state = 'published', storage_key = ?, sums = ?, meta = ?, published = ?"
                " WHERE id = ? AND state = 'writing'",
                (final_key, _pack_sums(sums), json.dumps(meta), time.time(), object_id),
            )
            if cur.rowcount != 1:
                raise PoolError(
                    f"segment #{object_id} was collected while being written: holder {holder.id} "
                    "let its lease expire (renew it, or raise the lease TTL)"
                )
            self._add_ref(db, object_id, holder, pin)
            rename()  # inside the transaction: GC's orphan scan (also a transaction) never sees it half-done

    def abort_write(self, object_id: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM objects WHERE id = ? AND state = 'writing'", (object_id,))

    def _record(self, row: tuple[Any, ...]) -> ObjectRecord:
        (oid, name, kind, state, key, size, chunk, sums, meta, writer, created, published, refs, pins) = row
        return ObjectRecord(
            oid,
            name,
            kind,
            state,
            key,
            size,
            chunk,
            _unpack_sums(sums),
            json.loads(meta),
            writer,
            created,
            published,
            refs or 0,
            pins or 0,
        )

    _SELECT = (
        "SELECT o.*, (SELECT SUM(count) FROM refs r WHERE r.object = o.id),"
        " (SELECT SUM(count) FROM refs r WHERE r.object = o.id AND r.pinned = 1) FROM objects o"
    )

    def lookup(self, name: str) -> ObjectRecord:
        with self._lock:
            row = self.db.execute(self._SELECT + " WHERE name = ? AND state = 'published'", (name,)).fetchone()
        if row is None:
            raise SegmentNotFound(f"no published segment named {name!r} in {self.path.parent}")
        return self._record(row)

    def list(self, include_all: bool = False) -> list[ObjectRecord]:
        where = "" if include_all else " WHERE state = 'published'"
        with self._lock:
            rows = self.db.execute(self._SELECT + where + " ORDER BY name").fetchall()
        return [self._record(r) for r in rows]

    # -- refs -----------------------------------------------------------------------------------
    @staticmethod
    def _add_ref(db: sqlite3.Connection, object_id: int, holder: Holder, pin: bool) -> None:
        db.execute(
            "INSERT INTO refs VALUES (?, ?, ?, 1) ON CONFLICT(object, holder, pinned) DO UPDATE SET count = count + 1",
            (object_id, holder.id, int(pin)),
        )

    def acquire(self, name: str, holder: Holder, pin: bool) -> ObjectRecord:
        with self.tx() as db:
            row = db.execute("SELECT id FROM objects WHERE name = ? AND state = 'published'", (name,)).fetchone()
            if row is None:
                raise SegmentNotFound(f"no published segment named {name!r} in {self.path.parent}")
            self._add_ref(db, row[0], holder, pin)
        return self.lookup(name)

    def release(self, object_id: int, holder: Holder, pin: bool) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE refs SET count = count - 1 WHERE object = ? AND holder = ? AND pinned = ?",
                (object_id, holder.id, int(pin)),
            )
            db.execute("DELETE FROM refs WHERE count <= 0")

    def delete(self, name: str, force: bool = False) -> ObjectRecord:
        """Take `name` out of the namespace and drop its pins; open users keep it until they release."""
        with self.tx() as db:
            row = db.execute("SELECT id FROM objects WHERE name = ? AND state = 'published'", (name,)).fetchone()
            if row is None:
                raise SegmentNotFound(f"no published segment named {name!r} in {self.path.parent}")
            users = self._needed_by(db, row[0])
            if users and not force:
                raise SegmentInUse(f"segment {name!r} is needed by {', '.join(users)}: delete those first")
            db.execute("UPDATE objects SET state = 'deleted' WHERE id = ?", (row[0],))
            db.execute("DELETE FROM refs WHERE object = ? AND pinned = 1", (row[0],))
            got = db.execute(self._SELECT + " WHERE id = ?", (row[0],)).fetchone()
        return self._record(got)

    @staticmethod
    def _needed_by(db: sqlite3.Connection, object_id: int) -> builtins.list[str]:
        rows = db.execute(
            "SELECT o.name FROM needs n JOIN objects o ON o.id = n.object WHERE n.needed = ? AND o.state = 'published'"
            " ORDER BY o.name",
            (object_id,),
        ).fetchall()
        return [name for (name,) in rows]

    def needed_by(self, name: str) -> builtins.list[str]:
        """The published objects that need `name` (empty when none, or no such object)."""
        with self._lock:
            row = self.db.execute("SELECT id FROM objects WHERE name = ? AND state = 'published'", (name,)).fetchone()
            return self._needed_by(self.db, row[0]) if row else []

    # -- garbage collection ---------------------------------------------------------------------
    def collect(self, storage_keys: Callable[[], set[str]], remove: Callable[[str], None]) -> GcReport:
        """Free what nothing references, in one transaction (so no publish is seen half-done)."""
        with self.tx() as db:
            expired, abandoned, abandoned_bytes = self._expire_holders(db, remove)
            more, more_bytes = self._drop_writes(db, remove, "writer NOT IN (SELECT holder FROM holders)")
            present = storage_keys()
            freed, freed_bytes = self._free_unreferenced(db, remove, present)
            orphans = self._remove_orphans(db, remove, present)
            freed += self._forget_vanished(db, present)
        return GcReport(expired, abandoned + more, freed, orphans, abandoned_bytes + more_bytes + freed_bytes)

    @staticmethod
    def _drop_writes(db: sqlite3.Connection, remove: Callable[[str], None], where: str, *args: Any) -> tuple[int, int]:
        """Remove in-progress writes matching `where`; (count, bytes)."""
        rows = db.execute(
            f"SELECT id, storage_key, size FROM objects WHERE state = 'writing' AND {where}", args
        ).fetchall()
        for oid, key, _size in rows:
            remove(key)
            db.execute("DELETE FROM objects WHERE id = ?", (oid,))
        return len(rows), sum(size for _, _, size in rows)

    def _expire_holders(self, db: sqlite3.Connection, remove: Callable[[str], None]) -> tuple[int, int, int]:
        """Dead holders lose their unpinned refs and their unfinished writes; (holders, writes, bytes)."""
        now = time.time()
        expired = abandoned = freed_bytes = 0
        for holder_id, host, pid, started, lease_until in db.execute("SELECT * FROM holders").fetchall():
            holder = Holder(host, pid, started)
            # On this host we know for sure whether the process lives; elsewhere only its lease says.
            alive = not holder.is_gone() if holder.is_local else lease_until >= now
            if alive:
                continue
            expired += 1
            db.execute("DELETE FROM refs WHERE holder = ? AND pinned = 0", (holder_id,))
            count, size = self._drop_writes(db, remove, "writer = ?", holder_id)
            abandoned, freed_bytes = abandoned + count, freed_bytes + size
            db.execute("DELETE FROM holders WHERE holder = ?", (holder_id,))
        return expired, abandoned, freed_bytes

    @staticmethod
    def _free_unreferenced(db: sqlite3.Connection, remove: Callable[[str], None], present: set[str]) -> tuple[int, int]:
        freed: list[tuple[int, str, int]] = []
        while True:  # a freed child may leave its parent unneeded: free that too
            rows = db.execute(
                "SELECT id, storage_key, size FROM objects WHERE state != 'writing'"
                " AND id NOT IN (SELECT object FROM refs) AND id NOT IN (SELECT needed FROM needs)"
            ).fetchall()
            if not rows:
                return len(freed), sum(size for _, key, size in freed if key in present)
            for oid, key, _size in rows:
                remove(key)
                db.execute("DELETE FROM needs WHERE object = ?", (oid,))
                db.execute("DELETE FROM objects WHERE id = ?", (oid,))
            freed += rows

    @staticmethod
    def _remove_orphans(db: sqlite3.Connection, remove: Callable[[str], None], present: set[str]) -> int:
        """Storage no row points at (what a crash between storage creation and commit leaves)."""
        known = {k for (k,) in db.execute("SELECT storage_key FROM objects")}
        for key in present - known:
            remove(key)
        return len(present - known)

    @staticmethod
    def _forget_vanished(db: sqlite3.Connection, present: set[str]) -> int:
        """Rows whose storage is gone (a memfd whose owner exited)."""
        rows = db.execute(
            "SELECT id FROM objects WHERE state != 'writing' AND storage_key NOT IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(present)),),
        ).fetchall()
        for (oid,) in rows:
            db.execute("DELETE FROM refs WHERE object = ?", (oid,))
            db.execute("DELETE FROM needs WHERE object = ? OR needed = ?", (oid, oid))
            db.execute("DELETE FROM objects WHERE id = ?", (oid,))
        return len(rows)
