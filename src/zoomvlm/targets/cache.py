"""A response cache in front of any target, so that rerunning an evaluation costs nothing.

``CachedTarget(target, "runs/cache.sqlite")`` is itself a :class:`~zoomvlm.targets.base.Target`. Each
request is keyed by

- the target's identity: its class, ``name`` (which carries the model and the per-view budget, e.g.
  ``ocr@side:384``), ``str(budget)`` and any extra ``identity`` the caller passes (generation settings,
  a checkpoint revision...), and
- the request's content: a hash of every view's pixels (mode, size and bytes of the image as PASSED,
  i.e. the original image and the crops cut from it, before the target shrinks them), the question,
  the per-view budgets and, for :meth:`CachedTarget.loglikelihood`, the answer scored.

A hit returns the stored answer with its ORIGINAL usage (pixels, tokens, seconds as measured when it was
computed) as a :class:`CachedGeneration` whose ``cached`` is True, so timing statistics stay those of real
calls and a record can say it was served from the cache. Only misses reach the wrapped target, batched.

Storage is one SQLite file (stdlib ``sqlite3``) in WAL mode: several processes (``--shard i/n`` on one
machine) can read and write it at once, and a write committed before a ``kill -9`` survives it. WAL needs
a local file system (not NFS). Nothing is ever evicted; delete the file to start afresh, e.g. after
changing a target's code (the identity holds its name and budget, not its source).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from zoomvlm.targets.base import Generation, Target, TargetRequest, Usage

logger = logging.getLogger(__name__)

__all__ = ["CachedGeneration", "CachedTarget", "image_digest", "request_key", "target_identity"]

# Why stdlib sqlite3 and not a library: the obvious one (diskcache) stores pickles, which a shared cache
# file should not have to be trusted with, and adds a dependency for ~40 lines of SQL; sqlite3 already
# gives atomic commits, crash safety and multi-process locking.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,   -- sha256 of (kind, target identity, request content)
    kind TEXT NOT NULL,     -- 'generate' | 'loglikelihood'
    target TEXT NOT NULL,   -- the target's name, for humans inspecting the file
    value TEXT NOT NULL     -- JSON: {"text", "usage"} for generate, {"loglikelihood"} otherwise
)
"""
_BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another process's write lock before raising


def _use_wal(conn: sqlite3.Connection, path: Path, timeout_s: float = _BUSY_TIMEOUT_S) -> None:
    """Put the database of ``conn`` in write-ahead-log mode, waiting up to ``timeout_s`` for other processes.

    Switching the journal mode needs the database to itself, and SQLite answers "database is locked" at once
    instead of waiting through the busy timeout when another connection is opening the same new file (two
    shards starting on one fresh cache hit this about once in eight starts). The mode is stored in the file,
    so whoever switches first switches it for everyone: retry, with backoff, until the file reads ``wal``.
    Raises ``sqlite3.OperationalError`` after ``timeout_s`` seconds.
    """
    deadline, delay = time.monotonic() + timeout_s, 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"{path}: could not switch to WAL mode, the database stayed locked")
        time.sleep(delay)
        delay = min(2 * delay, 0.2)


@dataclass(frozen=True)
class CachedGeneration(Generation):
    """A :class:`~zoomvlm.targets.base.Generation` served from the cache.

    ``usage`` is the usage measured by the call that computed it (its ``seconds`` are that call's, not
    the lookup's); ``cached`` is True so consumers can tell (``Record.cached``).
    """

    cached: bool = True


def image_digest(image: Image.Image) -> str:
    """Hex sha256 of an image's mode, size and raw pixel bytes (not of any file encoding), and of its palette for a
    palette image (whose bytes are only indices: two palettes over the same indices are two pictures).

    Two images with the same pixels hash alike whatever file they came from; any pixel change differs.
    """
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    if image.mode in ("P", "PA"):
        h.update(bytes(image.getpalette() or ()))
        h.update(repr(image.info.get("transparency")).encode())
    return h.hexdigest()


def target_identity(target: Target, extra: dict | None = None) -> dict:
    """What identifies a target's answers: its class, ``name``, ``budget``, the settings the target itself names
    as changing its answers (``target.cache_identity()``, when it has one: e.g. an API target's endpoint and
    ``max_tokens``) and ``extra`` (JSON-able)."""
    cls = type(target)
    own = getattr(target, "cache_identity", None)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "name": target.name,
        "budget": str(target.budget),
        **(own() if callable(own) else {}),
        **(extra or {}),
    }


def request_key(kind: str, identity: dict, request: TargetRequest) -> str:
    """The cache key (hex sha256) of one request to one target.

    Args:
        kind: ``"generate"`` or ``"loglikelihood"``.
        identity: from :func:`target_identity`.
        request: its views' pixels, question, per-view budgets and (loglikelihood) answer are hashed.
    """
    budgets = None if request.view_budgets is None else [None if b is None else str(b) for b in request.view_budgets]
    content = {
        "kind": kind,
        "target": identity,
        "views": [image_digest(im) for im in request.images],
        "question": request.question,
        "view_budgets": budgets,
        "answer": request.answer if kind == "loglikelihood" else None,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CachedTarget:
    """Any target behind a persistent response cache (same protocol: ``generate`` and ``loglikelihood``).

    Args:
        target: the target that computes misses.
        path: the SQLite file (created with its folders if missing); may be shared by runs and processes.
        identity: extra JSON-able settings that change the target's answers but not its ``name``.

    Attributes:
        name, budget: the wrapped target's, so a run's configuration is the same with or without cache.
        hits, misses: requests served from the cache / computed by the target, since construction.

    Raises:
        sqlite3.DatabaseError: ``path`` exists but is not a SQLite database.
    """

    def __init__(self, target: Target, path: str | Path, identity: dict | None = None):
        self.target = target
        self.name = target.name
        self.budget = target.budget
        self.path = Path(path)
        self.identity = target_identity(target, identity)
        self.hits = 0
        self.misses = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connect()  # fail now, not at the first batch, if the file is not a database

    def reference_visual_tokens(self, image, reference=None):
        """The wrapped target's RTR denominator in tokens (None when it does not count tokens)."""
        count = getattr(self.target, "reference_visual_tokens", None)
        return count(image, reference) if count is not None else None

    def _connect(self) -> sqlite3.Connection:
        # One connection per process and thread: sqlite3 connections must not cross a fork or a thread.
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)
            _use_wal(conn, self.path)
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            conn.execute(_SCHEMA)
            conn.commit()
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _lookup(self, keys: Sequence[str]) -> dict[str, dict]:
        conn = self._connect()
        found = {}
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for key, value in conn.execute(f"SELECT key, value FROM responses WHERE key IN ({marks})", chunk):
                found[key] = json.loads(value)
        return found

    def _store(self, kind: str, items: Sequence[tuple[str, dict]]) -> None:
        conn = self._connect()
        with conn:  # one transaction per batch: committed (and crash-safe) before the caller writes results
            conn.executemany(
                "INSERT OR REPLACE INTO responses (key, kind, target, value) VALUES (?, ?, ?, ?)",
                [(key, kind, self.name, json.dumps(value, ensure_ascii=False)) for key, value in items],
            )

    def generate(self, requests: Sequence[TargetRequest]) -> list[Generation]:
        """Answers of ``requests``: cached ones as :class:`CachedGeneration`, the rest from the target.

        Misses are sent to the wrapped target in one batch (in request order) and stored before returning.
        """
        keys = [request_key("generate", self.identity, r) for r in requests]
        found = self._lookup(keys)
        out: list[Generation | None] = [None] * len(requests)
        for i, key in enumerate(keys):
            if key in found:
                usage = dict(found[key]["usage"])
                usage["view_pixels"] = tuple(usage["view_pixels"])
                out[i] = CachedGeneration(found[key]["text"], Usage(**usage))
        missing = [i for i, g in enumerate(out) if g is None]
        if missing:
            fresh = self.target.generate([requests[i] for i in missing])
            if len(fresh) != len(missing):
                raise RuntimeError(f"target {self.name} returned {len(fresh)} answers for {len(missing)} requests")
            stored = []
            for i, gen in zip(missing, fresh, strict=True):
                out[i] = gen
                stored.append((keys[i], {"text": gen.text, "usage": asdict(gen.usage)}))
            self._store("generate", stored)
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        return out

    def loglikelihood(self, requests: Sequence[TargetRequest]) -> list[float]:
        """Log-likelihoods (nats) of the requests' answers, cached like :meth:`generate`.

        Raises:
            ValueError: a request has no ``answer`` (before any lookup).
            NotImplementedError: from the wrapped target, for misses, when it cannot score.
        """
        for i, r in enumerate(requests):
            if r.answer is None:
                raise ValueError(f"loglikelihood request {i} has no answer to score")
        keys = [request_key("loglikelihood", self.identity, r) for r in requests]
        found = self._lookup(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        values = {k: v["loglikelihood"] for k, v in found.items()}
        if missing:
            fresh = self.target.loglikelihood([requests[i] for i in missing])
            for i, value in zip(missing, fresh, strict=True):
                values[keys[i]] = float(value)
            self._store("loglikelihood", [(keys[i], {"loglikelihood": values[keys[i]]}) for i in missing])
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        return [values[k] for k in keys]

    def entries(self) -> int:
        """Entries in the cache file (all targets). A method, not ``__len__``: an empty cache is still truthy."""
        return self._connect().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        """Close this thread's connection (others close when garbage-collected)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
