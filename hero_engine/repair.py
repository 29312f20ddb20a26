"""Repair a damaged session folder (``python -m hero_engine repair <dir>``; docs/session_store.md).

What it restores, under the commit lock and the session lock (so no round commits meanwhile):

* ``session.json`` missing or damaged: rebuilt from the newest complete state folder's manifest
  (``state-NNNN/state.json`` holds the session.json that commit wrote), else from
  ``session.init.json`` (learning restarts at round 0);
* the state folder session.json names is missing, or a file in it is truncated or unreadable:
  the session goes back to the newest complete state (the previous round's, kept for this), and
  the rounds after it are trained again from their saved marks; with no complete state left,
  learning restarts at round 0;
* a round at or after the one in progress whose files are damaged (or whose trajectory is gone,
  so it cannot be trained again) is moved, with every later round, to
  ``rounds-archive/<time>/NNNN`` -- nothing a person marked is deleted;
* leftovers of killed writers (temp files, state folders no pointer names) are removed.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from .fileio import atomic_write_json
from .locks import FolderLock
from .session import (COMMIT_LOCK_NAME, INIT_META, LOCK_NAME, FORMAT_VERSION, Session,
                      SessionError, _state_folder_problem, complete_states, load_meta, read_json,
                      torch_load)

__all__ = ["repair", "RepairError"]


class RepairError(SessionError):
    """The folder cannot be repaired; the message says why and what is left."""


def _verify_state(d: Path) -> Optional[str]:
    """Why state folder ``d`` cannot be used (loads every file), or None."""
    p = _state_folder_problem(d)
    if p is not None:
        return p[0]
    for f in sorted(d.glob("*.pt")):
        try:
            torch_load(f)
        except SessionError as e:
            return str(e)
    return None


def _round_problem(path: Path, round_idx: int, trained: bool) -> Optional[str]:
    """Why the round's folder cannot be used again (marked, then trained), or None."""
    d = path / "rounds" / f"{round_idx:04d}"
    try:
        meta = read_json(d / "meta.json")
        n = int(meta["size"])
        gen = torch_load(d / "generated.pt")
        if "latents" not in gen or "log_probs" not in gen:
            return (f"{d / 'generated.pt'} has no trajectory left (round {round_idx} cannot be "
                    f"trained again)")
        for i in range(n):
            if not (d / "images" / f"{i:03d}.png").is_file():
                return f"{d / 'images' / f'{i:03d}.png'} is missing"
        if (d / "marks.json").exists():
            from .feedback import Marks
            Marks.from_json(read_json(d / "marks.json")).validate(n, True)
        elif trained:
            return f"{d / 'marks.json'} is missing"
    except SessionError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - anything unreadable is a damaged round
        return f"round {round_idx} ({d}) is damaged: {type(e).__name__}: {e}"
    return None


def repair(path: str | Path, apply: bool = True) -> dict:
    """Check ``path`` and restore it (``apply=False``: only say what would be done).
    Returns {"problems": [...], "actions": [...], "round": the round in progress afterwards,
    "changed": bool}."""
    path = Path(path)
    if not path.is_dir():
        raise RepairError(f"no session folder at {path}")
    problems: list[str] = []
    actions: list[str] = []
    with FolderLock(path, COMMIT_LOCK_NAME), FolderLock(path, LOCK_NAME):
        # 1. session.json
        try:
            meta = load_meta(path)
            source = None
        except SessionError as e:
            if "format version" in str(e):
                raise
            problems.append(str(e))
            meta = None
        states = complete_states(path, verify=True)
        if meta is None:
            if states:
                meta, source = dict(states[0]["meta"]), f"{states[0]['dir']}/state.json"
            elif (path / INIT_META).is_file():
                meta, source = read_json(path / INIT_META), INIT_META
                if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
                    raise RepairError(f"{path / INIT_META} is damaged too; nothing to rebuild "
                                      f"session.json from: start a new session (rounds/ keeps "
                                      f"the images and marks)")
            else:
                raise RepairError(f"{path / 'session.json'} is missing or damaged and no complete "
                                  f"state folder or {INIT_META} is left to rebuild it from; start "
                                  f"a new session (rounds/ keeps the images and marks)")
            actions.append(f"rebuild session.json from {source}")
        old_next = int(meta["next_round"])
        new = dict(meta)
        # 2. the state it names
        cur = meta.get("state_dir")
        bad = None if cur is None else _verify_state(path / cur)
        if bad is not None:
            problems.append(bad)
            older = [c for c in states if c["dir"] != cur and c["round"] < old_next]
            if older:
                c = older[0]
                new = dict(c["meta"])
                new["info"] = dict(meta.get("info") or {})
                prev = new.get("prev_state_dir")
                if prev is not None and _verify_state(path / prev) is not None:
                    new["prev_state_dir"] = None
                actions.append(f"go back to {c['dir']}: the state after round {c['round']} "
                               f"(round {c['round'] + 1} is trained again from its marks)")
            else:
                # labels_used: the marks used (the key keeps its old name for stored sessions)
                new.update(next_round=0, labels_used=0, best=None, state_dir=None,
                           prev_state_dir=None, history=[])
                actions.append("no complete state left: learning restarts at round 0")
        prev = new.get("prev_state_dir")
        if prev is not None and _verify_state(path / prev) is not None:
            problems.append(f"the previous state {prev} is not complete")
            new["prev_state_dir"] = None
            actions.append(f"forget the previous state {prev} (the current one is sound)")
        # 3. rounds from the one in progress on: trainable again, or archived
        target = int(new["next_round"])
        round_idx, archive_from = target, None
        while (path / "rounds" / f"{round_idx:04d}").is_dir():
            why = _round_problem(path, round_idx, trained=round_idx < old_next)
            meta_file = path / "rounds" / f"{round_idx:04d}" / "meta.json"
            if why is not None and not (meta_file.exists() or round_idx < old_next):
                why = None  # an empty folder of a round never generated: harmless
            if why is not None:
                problems.append(why)
                archive_from = round_idx
                break
            round_idx += 1
        to_archive = []
        if archive_from is not None:
            to_archive = sorted(int(p.name) for p in (path / "rounds").iterdir()
                                if p.name.isdigit() and int(p.name) >= archive_from)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            actions.append(f"move rounds {to_archive[0]}..{to_archive[-1]} to "
                           f"rounds-archive/{stamp}/ (kept with their marks; they are not "
                           f"trained again)")
        changed = bool(actions)
        if apply:
            if to_archive:
                dest = path / "rounds-archive" / stamp
                dest.mkdir(parents=True, exist_ok=True)
                for r in to_archive:
                    shutil.move(str(path / "rounds" / f"{r:04d}"), str(dest / f"{r:04d}"))
            if changed:
                atomic_write_json(path / "session.json", new)
            removed = Session(path, new).clean_leftovers(commit_lock_held=True)
            if removed:
                actions.append("removed leftovers: " + ", ".join(removed))
    return {"problems": problems, "actions": actions, "round": int(new["next_round"]),
            "changed": changed or bool(apply and actions)}
