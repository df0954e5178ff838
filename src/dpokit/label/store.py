"""The label database: items, the queue and every answer in one SQLite file (WAL mode).

Why SQLite: one file, in the standard library, and each answer is one transaction committed (synchronous=FULL)
before the HTTP response returns, so a killed server loses nothing that a browser was told is saved. The unique
key (item, annotator) means two tabs or two browsers can never count one person twice on one item.

The queue: an annotator first gets back the item they were shown and have not answered (a reload resumes it);
otherwise the item with the fewest answers (skips not counted; items shown to someone else in the last
`CLAIM_SECONDS` count as taken) among those they have not answered and that have fewer than `overlap` answers.
Left/right order is drawn per (item, annotator) from the DB's seed and recorded with each answer.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.core.errors import UserError
from dpokit.label.source import Item, fingerprint, read_source

SCHEMA_VERSION = 1
CLAIM_SECONDS = 600  # an item shown and left unanswered this long goes back to the pool for others
SIDES = {"left", "right", "tie", "skip"}

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY, line INTEGER NOT NULL, prompt TEXT NOT NULL,
    first TEXT NOT NULL, second TEXT NOT NULL, first_name TEXT NOT NULL, second_name TEXT NOT NULL,
    images TEXT NOT NULL DEFAULT '[]');
CREATE TABLE claims (
    item INTEGER NOT NULL REFERENCES items(id), annotator TEXT NOT NULL, shown_at REAL NOT NULL,
    PRIMARY KEY (item, annotator));
CREATE TABLE labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('first', 'second', 'tie', 'skip')),
    left_answer TEXT NOT NULL CHECK (left_answer IN ('first', 'second')),
    reason TEXT NOT NULL DEFAULT '',
    shown_at REAL NOT NULL,
    answered_at REAL NOT NULL,
    UNIQUE (item, annotator));
"""


class Conflict(Exception):
    """An answer that cannot be taken (already answered, never shown): the page fetches the next item."""


@dataclass
class Shown:
    """One item as an annotator sees it: the answers already in the order shown."""

    item: int
    prompt: object
    left: str
    right: str
    images: list[str] = field(default_factory=list)  # the prompt's image files (absolute paths)


def connect(path: str | Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), one per answer.
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=10)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def read_meta(path: str | Path) -> dict[str, str]:
    """The DB's meta table, checked to be a dpokit label DB of this schema version; reads only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; `dpokit label serve SOURCE --db {path}` creates it")
    conn = connect(path)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:
        raise UserError(f"{path}: not a dpokit label database; give another --db path") from None
    finally:
        conn.close()
    if meta.get("kind") != "dpokit-label":
        raise UserError(f"{path}: not a dpokit label database; give another --db path")
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise UserError(f"{path}: label database schema version {meta.get('schema_version')}, this dpokit reads "
                        f"{SCHEMA_VERSION}; use the dpokit that wrote it")
    return meta


class LabelStore:
    """The open DB of one `dpokit label serve`. Methods are called from one thread (the server's event loop);
    BEGIN IMMEDIATE still serialises writers should two processes share the file."""

    def __init__(self, conn: sqlite3.Connection, seed: int, overlap: int):
        self.conn, self.seed, self.overlap = conn, seed, overlap

    def close(self) -> None:
        self.conn.close()

    def left_answer(self, item: int, annotator: str) -> str:
        """Which answer ('first' or 'second') is on the left for this annotator: seeded, so a reload shows the
        same order, and drawn per annotator, so position bias is measurable apart from the items."""
        return "first" if random.Random(f"{self.seed}:{item}:{annotator}").random() < 0.5 else "second"

    def _shown(self, item: int, annotator: str) -> Shown:
        prompt, first, second, images = self.conn.execute(
            "SELECT prompt, first, second, images FROM items WHERE id = ?", (item,)).fetchone()
        left, right = (first, second) if self.left_answer(item, annotator) == "first" else (second, first)
        return Shown(item, json.loads(prompt), left, right, json.loads(images))


    def next_item(self, annotator: str) -> Shown | None:
        """The item to show `annotator` now (claimed for them), or None when nothing is left for them."""
        now = time.time()
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT item FROM claims WHERE annotator = ? ORDER BY shown_at LIMIT 1",
                               (annotator,)).fetchone()
            if row is None:
                row = conn.execute(
                    """SELECT id FROM (
                         SELECT i.id,
                           (SELECT COUNT(*) FROM labels l WHERE l.item = i.id AND l.choice != 'skip')
                           + (SELECT COUNT(*) FROM claims c WHERE c.item = i.id AND c.annotator != :a
                              AND c.shown_at > :fresh) AS n
                         FROM items i
                         WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item = i.id AND l.annotator = :a))
                       WHERE n < :k ORDER BY n, id LIMIT 1""",
                    {"a": annotator, "fresh": now - CLAIM_SECONDS, "k": self.overlap}).fetchone()
                if row is not None:
                    conn.execute("INSERT INTO claims (item, annotator, shown_at) VALUES (?, ?, ?)",
                                 (row[0], annotator, now))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return None if row is None else self._shown(row[0], annotator)

    def answer(self, annotator: str, item: int, side: str, reason: str = "") -> None:
        """Record `side` (left, right, tie, skip) for an item shown to `annotator`; committed on return."""
        assert side in SIDES, side  # the server validated it
        left = self.left_answer(item, annotator)
        choice = {"left": left, "right": "second" if left == "first" else "first"}.get(side, side)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            claim = conn.execute("SELECT shown_at FROM claims WHERE item = ? AND annotator = ?",
                                 (item, annotator)).fetchone()
            if claim is None:
                done = conn.execute("SELECT 1 FROM labels WHERE item = ? AND annotator = ?",
                                    (item, annotator)).fetchone()
                raise Conflict(f"item {item} already answered by {annotator}" if done
                               else f"item {item} was not shown to {annotator}; ask for the next item")
            conn.execute("INSERT INTO labels (item, annotator, choice, left_answer, reason, shown_at, answered_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (item, annotator, choice, left, reason, claim[0], time.time()))
            conn.execute("DELETE FROM claims WHERE item = ? AND annotator = ?", (item, annotator))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def undo(self, annotator: str) -> int | None:
        """Take back the annotator's last answer; that item is shown again next. None when nothing to undo."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT id, item FROM labels WHERE annotator = ? ORDER BY id DESC LIMIT 1",
                               (annotator,)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM labels WHERE id = ?", (row[0],))
                conn.execute("DELETE FROM claims WHERE annotator = ?", (annotator,))  # the current item goes back
                conn.execute("INSERT INTO claims (item, annotator, shown_at) VALUES (?, ?, ?)",
                             (row[1], annotator, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return None if row is None else row[1]

    def progress(self, annotator: str) -> dict:
        """Counts for the page: answered by this annotator, items, items with `overlap` answers."""
        conn = self.conn
        (mine,) = conn.execute("SELECT COUNT(*) FROM labels WHERE annotator = ?", (annotator,)).fetchone()
        (items,) = conn.execute("SELECT COUNT(*) FROM items").fetchone()
        (complete,) = conn.execute(
            "SELECT COUNT(*) FROM (SELECT item FROM labels WHERE choice != 'skip' GROUP BY item HAVING COUNT(*) >= ?)",
            (self.overlap,)).fetchone()
        (left_for_me,) = conn.execute(
            """SELECT COUNT(*) FROM items i
               WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item = i.id AND l.annotator = :a)
                 AND (SELECT COUNT(*) FROM labels l WHERE l.item = i.id AND l.choice != 'skip') < :k""",
            {"a": annotator, "k": self.overlap}).fetchone()
        return {"answered": mine, "remaining": left_for_me, "items": items, "complete": complete,
                "overlap": self.overlap}


def open_store(db: str | Path, source: str | Path, *, overlap: int = 1, seed: int | None = None) -> LabelStore:
    """Open (or create) the label DB of `source`. Every check runs before the DB is written: a source that does not
    read, or an existing DB made from another source, raises a UserError and leaves the DB as it was."""
    if overlap < 1:
        raise UserError(f"--overlap {overlap}: each item needs at least one answer; use --overlap 1 or more")
    items, _ = read_source(source)
    digest = fingerprint(source)
    db = Path(db)
    if db.exists():
        meta = read_meta(db)
        if meta["source_sha256"] != digest:
            raise UserError(f"{db} was made from another source ({meta['source_path']}, sha256 "
                            f"{meta['source_sha256'][:12]}), not {source} (sha256 {digest[:12]}); give the DB's "
                            "own source or a new --db path")
        if seed is not None and str(seed) != meta["seed"]:
            raise UserError(f"--seed {seed}: {db} was created with seed {meta['seed']}; drop --seed or use a new --db")
        conn = connect(db)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        add_images_column(conn)
        return LabelStore(conn, int(meta["seed"]), overlap)
    if not db.parent.is_dir():
        raise UserError(f"--db {db}: folder {db.parent} does not exist; create it first")
    seed = 0 if seed is None else seed
    conn = connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        meta = {"kind": "dpokit-label", "schema_version": str(SCHEMA_VERSION), "source_sha256": digest,
                "source_path": str(source), "seed": str(seed), "created": str(time.time())}
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        conn.executemany(
            "INSERT INTO items (id, line, prompt, first, second, first_name, second_name, images) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [_item_row(i, item) for i, item in enumerate(items)])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        db.unlink(missing_ok=True)
        raise
    return LabelStore(conn, seed, overlap)


def add_images_column(conn: sqlite3.Connection) -> None:
    """A DB written before items had images (text items only): the column, empty for each item."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
    if "images" not in columns:
        conn.execute("ALTER TABLE items ADD COLUMN images TEXT NOT NULL DEFAULT '[]'")


def _item_row(i: int, item: Item) -> tuple:
    return (i, item.line, json.dumps(item.prompt, ensure_ascii=False), item.first, item.second, item.first_name,
            item.second_name, json.dumps(item.images, ensure_ascii=False))
