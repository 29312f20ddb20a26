"""A minimal stand-in for ``hero_engine.session.Session`` with the same marks contract (atomic,
fsync'd JSON per round; recording a round twice raises). Used where the engine session is not
needed or not yet available."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from .pack_import import import_pack_module

Marks = import_pack_module("hero_engine.feedback").Marks


class FakeSession:
    def __init__(self, path, session_id: str = "test", budget: int = 100, best: Optional[str] = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.session_id = session_id
        self.config = SimpleNamespace(budget=budget)
        self._best = best
        self._lock = threading.Lock()
        self.writes = 0

    def _file(self, r: int) -> Path:
        return self.path / f"marks_{r:04d}.json"

    def record_marks(self, round_idx: int, marks: Marks) -> None:
        with self._lock:
            f = self._file(round_idx)
            if f.exists():
                raise FileExistsError(f"round {round_idx} already has marks")
            tmp = f.with_suffix(".tmp")
            with open(tmp, "w") as fh:
                json.dump(marks.to_json(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, f)
            self.writes += 1

    def marks_for(self, round_idx: int) -> Optional[Marks]:
        f = self._file(round_idx)
        return Marks.from_json(json.loads(f.read_text())) if f.exists() else None

    def best_image_path(self):
        return self._best

    @property
    def labels_used(self) -> int:
        return sum(Marks.from_json(json.loads(f.read_text())).count
                   for f in sorted(self.path.glob("marks_*.json")))
