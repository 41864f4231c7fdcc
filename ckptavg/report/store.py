"""The results store: one SQLite file, one row per (model, run tag, step, task, metric, limit).

Rows are upserted, so a re-run replaces what it re-scores and skips what is already there.
Several processes may write one store at once (a study's jobs on one machine): each write is one
immediate transaction that waits for the others (busy timeout) and replaces a whole checkpoint x
task group, so no row is lost or duplicated, whatever the interleaving. The store runs in WAL mode,
which needs every writer on one host; jobs on other nodes write stores of their own, and `merge`
folds them into one.
A task that failed for one checkpoint is stored as a row with status "failed" and its error,
and is tried again on the next run. Only the standard library is used, so tables, plots and
savings work on a machine without torch or lm-eval.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import InputError, IOFailure

ORIGINAL = "original"


@dataclass(frozen=True)
class Row:
    model: str  # the trajectory: a repo name or local run name, e.g. pythia-1b-deduped
    tag: str  # "original", or the averaging run, e.g. lawa-k5-nu1000
    method: str  # original | lawa | ema | swa
    k: int | None
    nu: int | None
    step: int
    task: str
    metric: str  # "" on a failed row
    value: float | None
    stderr: float | None
    higher_is_better: bool | None
    limit: int  # 0 = every document
    status: str  # ok | failed
    error: str
    lm_eval_version: str
    checkpoint: str  # the folder that was scored
    time: float
    # the scoring settings, part of a score (lm-eval's numbers move with the batch size, lm-eval #704);
    # empty in rows stored before ckptavg recorded them
    batch_size: str = ""
    dtype: str = ""
    device: str = ""

    @property
    def settings(self) -> tuple[str, str, str]:
        return (self.batch_size, self.dtype, self.device)


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


_COLUMNS = [f.name for f in fields(Row)]
_SCHEMA = (f"CREATE TABLE IF NOT EXISTS scores ({_quoted(_COLUMNS)}, "
           f'PRIMARY KEY (model, tag, step, task, metric, "limit"))')


# what went to which tracker (`report/tracking.py`): one entry per score and tracker, with the score's time
_LEDGER = ('CREATE TABLE IF NOT EXISTS exported (tracker, model, tag, step, task, metric, "limit", time, '
           'PRIMARY KEY (tracker, model, tag, step, task, metric, "limit"))')
_KEY = ("model", "tag", "step", "task", "metric", "limit")
_S_COLUMNS = ", ".join(f's."{c}"' for c in _COLUMNS)
_JOINED = " AND ".join(f'e."{c}" = s."{c}"' for c in _KEY)
_MATCH = " AND ".join(f'"{c}"=?' for c in _KEY)

BUSY_TIMEOUT_S = 600  # a writer waits this long for another's transaction (a score takes far less to store)
_RETRY_S = 0.01  # first pause between tries of the switch to WAL, doubled up to 0.5 s


def _code(e: sqlite3.Error) -> int | None:
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+; an extended code, whose low byte is the primary
    return None if code is None else code & 0xFF


def _is_busy(e: sqlite3.Error) -> bool:
    code = _code(e)
    if code is not None:
        return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(e)


def _not_a_database(e: sqlite3.Error) -> bool:
    code = _code(e)
    if code is not None:
        return code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)
    return "not a database" in str(e) or "malformed" in str(e)


def _read_only_folder(folder: Path) -> bool:
    """A WAL store needs its folder writable (for its -wal and -shm files), even to be read."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY) or not os.access(folder, os.W_OK)
    except OSError:
        return False


class Store:
    def __init__(self, path: Path, *, timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit: every write below opens its own IMMEDIATE transaction, so a writer takes the lock
        # before it reads what it will replace (a deferred one could deadlock with another writer)
        self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self.timeout = timeout
        try:
            self._open(time.monotonic() + timeout)
        except sqlite3.Error as e:
            self.db.close()
            if _not_a_database(e):
                raise InputError(f"{self.path}: not a ckptavg results database ({e})") from None
            raise self._failure(e) from None

    def _failure(self, e: sqlite3.Error) -> IOFailure:
        """What SQLite said, as one line that says what happened."""
        if _is_busy(e):
            return IOFailure(f"{self.path}: the results database stayed locked by another process for "
                             f"{self.timeout:g} s ({e})")
        if _code(e) == sqlite3.SQLITE_READONLY or "readonly" in str(e) or _read_only_folder(self.path.parent):
            return IOFailure(f"{self.path}: the results database is read-only here ({e}): give a writable --results")
        return IOFailure(f"{self.path}: the results database failed ({e})")

    def _open(self, deadline: float) -> None:
        """Switch to WAL and create or migrate the schema, safe against other processes doing the same.

        Switching a file to WAL needs its write lock, and SQLite answers SQLITE_BUSY at once, without
        its busy handler, when another connection holds it (waiting there could deadlock), so the switch
        is tried again until the deadline. The schema is created and migrated inside one IMMEDIATE
        transaction, where the busy timeout does apply, and the columns are read under that lock: two
        processes migrating one old store add each column once."""
        pause = _RETRY_S
        while self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(0.5, pause * 2)
        if self._missing_columns() != []:  # asked without a lock first: a current store opens read-only
            with self._transaction():
                missing = self._missing_columns()
                if missing is None:
                    self.db.execute(_SCHEMA)
                for column in missing or ():  # a store from before a column existed
                    self.db.execute(f'ALTER TABLE scores ADD COLUMN "{column}" DEFAULT \'\'')

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One IMMEDIATE transaction: the write lock is taken before anything is read (the busy timeout
        applies), and a failure rolls everything back."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _missing_columns(self) -> list[str] | None:
        """The columns this version writes that the table lacks; None when there is no table yet."""
        have = {r[1] for r in self.db.execute("PRAGMA table_info(scores)")}
        return [c for c in _COLUMNS if c not in have] if have else None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def done(self, model: str, tag: str, step: int, task: str, limit: int) -> bool:
        """Whether this checkpoint already has successful scores for this task."""
        cur = self.db.execute('SELECT 1 FROM scores WHERE model=? AND tag=? AND step=? AND task=? AND "limit"=? '
                              "AND status='ok' LIMIT 1", (model, tag, step, task, limit))
        return cur.fetchone() is not None

    def put(self, rows: Sequence[Row]) -> None:
        """Replace every row of the (model, tag, step, task, limit) groups in `rows` at once."""
        try:
            with self._transaction():
                for key in {(r.model, r.tag, r.step, r.task, r.limit) for r in rows}:
                    self.db.execute('DELETE FROM scores WHERE model=? AND tag=? AND step=? AND task=? AND "limit"=?',
                                    key)
                self.db.executemany(f"INSERT INTO scores ({_quoted(_COLUMNS)}) "
                                    f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                                    [tuple(asdict(r).values()) for r in rows])
        except sqlite3.OperationalError as e:
            raise self._failure(e) from None

    def merge(self, other: Path) -> int:
        """Fold another store (a job's own) into this one, group by group as `put` does: the newer of two
        scores of one checkpoint x task wins. Returns the number of groups taken."""
        with Store(other) as source:
            groups: dict[tuple, list[Row]] = {}
            for row in source.rows(status=None):
                groups.setdefault((row.model, row.tag, row.step, row.task, row.limit), []).append(row)
        taken = 0
        for key, rows in groups.items():
            ours = self.db.execute('SELECT MAX(time) FROM scores WHERE model=? AND tag=? AND step=? AND task=? '
                                   'AND "limit"=?', key).fetchone()[0]
            if ours is None or ours < max(r.time for r in rows):
                self.put(rows)
                taken += 1
        return taken

    def rows(self, *, model: str | None = None, task: str | None = None, metric: str | None = None,
             status: str | None = "ok") -> list[Row]:
        where, args = [], []
        for col, val in (("model", model), ("task", task), ("metric", metric), ("status", status)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = f"SELECT {_quoted(_COLUMNS)} FROM scores" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY model, step, task, metric, tag"
        return [_row(rec) for rec in self.db.execute(sql, args)]

    def claim_for(self, tracker: str, *, force: bool = False) -> list[Row]:
        """The successful scores not yet sent to `tracker` (or scored again since), marked as sent in the same
        transaction that finds them: two processes exporting at once never both send one."""
        try:
            with self._transaction():
                self.db.execute(_LEDGER)
                if force:
                    self.db.execute("DELETE FROM exported WHERE tracker=?", (tracker,))
                rows = [_row(rec) for rec in self.db.execute(
                    f"SELECT {_S_COLUMNS} FROM scores s "
                    f"LEFT JOIN exported e ON e.tracker=? AND {_JOINED} "
                    "WHERE s.status='ok' AND s.value IS NOT NULL AND (e.time IS NULL OR e.time < s.time) "
                    "ORDER BY s.model, s.step, s.task, s.metric, s.tag", (tracker,))]
                self.db.executemany(f"INSERT OR REPLACE INTO exported (tracker, {_quoted(_KEY)}, time) "
                                    f"VALUES ({', '.join('?' * (len(_KEY) + 2))})",
                                    [(tracker, *(getattr(r, c) for c in _KEY), r.time) for r in rows])
        except sqlite3.OperationalError as e:
            raise self._failure(e) from None
        return rows

    def unclaim(self, tracker: str, rows: Sequence[Row]) -> None:
        """Give back a claim whose scores could not be sent: the next export sends them."""
        with self._transaction():
            self.db.executemany(f"DELETE FROM exported WHERE tracker=? AND {_MATCH}",
                                [(tracker, *(getattr(r, c) for c in _KEY)) for r in rows])


def _row(rec: tuple) -> Row:
    row = dict(zip(_COLUMNS, rec, strict=True))
    hib = row["higher_is_better"]
    row["higher_is_better"] = None if hib is None else bool(hib)
    return Row(**row)


def open_results(path: Path, must_exist: bool = True) -> Store:
    if must_exist and not Path(path).is_file():
        raise InputError(f"{path}: no results database (run `ckptavg eval` first)")
    return Store(path)


def failed_row(model: str, tag: str, method: str, k: int | None, nu: int | None, step: int, task: str, limit: int,
               error: str, version: str, checkpoint: str) -> Row:
    return Row(model, tag, method, k, nu, step, task, "", None, None, None, limit, "failed", error, version,
               checkpoint, time.time())
