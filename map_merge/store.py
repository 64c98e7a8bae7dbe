"""Evaluation store: every (coefficient vector, task) result persisted the moment it exists.

Results are keyed by an objective fingerprint (task vectors, merge method and settings, any
user key), the exact coefficient vector (its float64 bytes) and the task name. With a path the
store is an embedded SQLite file that survives a killed run; without one it lives in memory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["EvaluationStore", "as_store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    fingerprint TEXT NOT NULL,
    coeffs      BLOB NOT NULL,
    task        TEXT NOT NULL,
    value       REAL NOT NULL,
    coeffs_json TEXT NOT NULL,
    created     REAL NOT NULL,
    PRIMARY KEY (fingerprint, coeffs, task)
)
"""


def coeff_key(row: np.ndarray) -> bytes:
    """Exact key of one coefficient vector: its float64 bytes (``-0.0`` folded into ``0.0``)."""
    return (np.asarray(row, dtype=np.float64).reshape(-1) + 0.0).tobytes()


class EvaluationStore:
    """Persistent ``(fingerprint, coeffs, task) -> value`` table.

    Args:
        path: SQLite file (created with its folder if missing); ``None`` keeps results in memory.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL" if self.path else "PRAGMA journal_mode=MEMORY")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(_SCHEMA)
        self._conn.commit()
        self._lock = threading.Lock()

    @classmethod
    def snapshot(cls, path: str | os.PathLike) -> "EvaluationStore":
        """An in-memory store holding a copy of the store file ``path``, which is opened read-only
        and never written (new results stay in memory); empty when there is no such file."""
        store = cls(None)
        path = Path(path)
        if not path.is_file():
            return store
        source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = source.execute("SELECT * FROM evaluations").fetchall()
        except sqlite3.OperationalError:  # a store file without results yet
            rows = []
        finally:
            source.close()
        with store._lock:
            store._conn.executemany("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?)", rows)
            store._conn.commit()
        return store

    def get(self, fingerprint: str, coeffs: np.ndarray, tasks: Sequence[str]) -> np.ndarray:
        """Stored values ``(K, M)`` for ``coeffs: (K, T)`` and M tasks; NaN where missing."""
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        out = np.full((coeffs.shape[0], len(tasks)), np.nan)
        column = {t: j for j, t in enumerate(tasks)}
        with self._lock:
            for i, row in enumerate(coeffs):
                cursor = self._conn.execute(
                    "SELECT task, value FROM evaluations WHERE fingerprint=? AND coeffs=?",
                    (fingerprint, coeff_key(row)),
                )
                for task, value in cursor:
                    j = column.get(task)
                    if j is not None:
                        out[i, j] = value
        return out

    def put(self, fingerprint: str, coeffs: np.ndarray, values: dict[str, float]) -> None:
        """Persist the results of one coefficient vector (committed before returning)."""
        row = np.asarray(coeffs, dtype=np.float64).reshape(-1)
        key = coeff_key(row)
        now = time.time()
        text = json.dumps(row.tolist())
        with self._lock:
            self._conn.executemany(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?)",
                [(fingerprint, key, task, float(v), text, now) for task, v in values.items()],
            )
            self._conn.commit()

    def count(self, fingerprint: str | None = None) -> int:
        """Number of stored (coefficient vector, task) results, for one fingerprint or all."""
        with self._lock:
            if fingerprint is None:
                return self._conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
            return self._conn.execute("SELECT COUNT(*) FROM evaluations WHERE fingerprint=?", (fingerprint,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"EvaluationStore({str(self.path) if self.path else ':memory:'})"


def as_store(store: EvaluationStore | str | os.PathLike | None) -> EvaluationStore | None:
    """A store given as itself or as a path (opened there), or ``None``."""
    return store if store is None or isinstance(store, EvaluationStore) else EvaluationStore(store)
