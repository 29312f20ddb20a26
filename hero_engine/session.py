"""A HERO session on disk: config, rounds, marks, noises, LoRA / encoder / optimizer state, metrics.

Layout (every file written atomically: temp file + fsync + rename)::

    <dir>/session.json            format, id, config, next round, marks used, best record,
                                  state dir (+ the previous one), info (layout, last export)
    <dir>/session.init.json       session.json as created (repair rebuilds from it if needed)
    <dir>/.lock                   the session lock (flock): one writer of session.json at a time
    <dir>/.commit.lock            held while a round's state folder is being written
    <dir>/rounds/0003/            one folder per round
        generated.pt              x_T noises, trajectory (latents, log-probs, schedule), features
        meta.json                 prompts, size, seeds, centre ids, time
        images/000.png ...        the decoded batch (what the person marked)
        marks.json                the marks, written before the marks API answers "saved"
        metrics.json              written when the round is trained
    <dir>/state-0004/             the learned state after round 3: lora.pt, policy_opt.pt,
                                  encoder.pt, best.pt, pool.pt, and state.json (file sizes + the
                                  session.json this commit wrote)
    <dir>/state-0003/             the state before round 3, kept for repair (one round back)

A round is *completed* when ``session.json`` points at the state folder written after it: the
pointer flips in one atomic rename, so a kill at any moment leaves the previous complete state, and
a re-opened session continues at the first round not completed, with every saved mark.

Concurrency (docs/session_store.md): every change of ``session.json`` is a read-modify-write under
the session lock (threads and processes), so no writer publishes a stale view; readers of the state
take the same lock, and a state folder is deleted only under it, after the pointer that replaced it
is durable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from .feedback import Marks, MarksError
from .fileio import (TEMP_SUFFIX, atomic_torch_save, atomic_write_bytes, atomic_write_json,
                     fsync_dir, remove_stale_temps)
from .locks import FolderLock
from .lora import LoraState, read_session_lora
from .policy import PolicyConfig
from .representation import RepresentationConfig

__all__ = ["HeroConfig", "Session", "SessionError", "SessionDamaged", "FORMAT_VERSION",
           "valid_session_id", "STATE_FILES"]

FORMAT_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STATE_RE = re.compile(r"^state-(\d{4,})$")
STATE_FILES = ("lora", "policy_opt", "encoder", "best", "pool")
LOCK_NAME = ".lock"
COMMIT_LOCK_NAME = ".commit.lock"
MANIFEST = "state.json"
INIT_META = "session.init.json"


class SessionError(RuntimeError):
    """A session folder that cannot be used as it is; the message names the file and the fix."""


class SessionDamaged(SessionError):
    """A session whose files were damaged (deleted or truncated by hand, a disk fault): the message
    names the file and what ``python -m hero_engine repair`` would restore."""

    def __init__(self, message: str, path: Optional[Path] = None):
        super().__init__(message)
        self.path = path


def repair_command(path: Path) -> str:
    return f"python -m hero_engine repair {path}"


def valid_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _ID_RE.match(session_id):
        raise SessionError(f"invalid session id {session_id!r}: use 1-64 letters, digits, '_' or "
                           f"'-' (no spaces, dots or slashes)")
    return session_id


# Each method is a set of traits; the loop reads the traits, never the method's name.
#   guidance        feedback-guided initial noise for the person's batch (HERO section 4)
#   guided_policy   the guided chains train the policy too (the paper); False: they teach the
#                   representation only, and the policy learns from fresh-noise chains
#   reward          "similarity": the learned similarity to the best (the paper);
#                   "marks+similarity": the marks as the backbone, the learned similarity as graded
#                   credit within each class (a marked-bad image never outranks a marked-good one);
#                   "marks": 1 good / 0 bad, no representation network (ddpo-binary, d3po)
#   reward_features trunk E(f) (the paper) or head g(E(f)) (what the triplet loss shapes)
#   encoder_replay  triplets from every marked round so far (False: the round's own, the paper)
#   extra_ratio     unmarked N(0, I) samples per round, as a multiple of the batch, that the
#                   representation scores for the policy update (0: only the marked batch)
#   update          "ppo" (DDPO's clipped objective), "d3po", or "rwr" (reward-weighted denoising on
#                   every image marked so far, denoising.py)
METHOD_TRAITS: dict[str, dict] = {
    "hero": dict(guidance=True, guided_policy=True, reward="marks+similarity",
                 reward_features="head", encoder_replay=True, extra_ratio=0.0, update="rwr"),
    "hero-paper": dict(guidance=True, guided_policy=True, reward="similarity",
                       reward_features="trunk", encoder_replay=False, extra_ratio=0.0,
                       update="ppo"),
    "hero-no-guidance": dict(guidance=False, guided_policy=True, reward="similarity",
                             reward_features="trunk", encoder_replay=False, extra_ratio=0.0,
                             update="ppo"),
    "ddpo-binary": dict(guidance=False, guided_policy=True, reward="marks",
                        reward_features="trunk", encoder_replay=False, extra_ratio=0.0,
                        update="ppo"),
    "d3po": dict(guidance=False, guided_policy=True, reward="marks", reward_features="trunk",
                 encoder_replay=False, extra_ratio=0.0, update="d3po"),
    # the strongest baseline we know: the same denoising update as hero on the raw marks
    "rwr-binary": dict(guidance=False, guided_policy=True, reward="marks",
                       reward_features="trunk", encoder_replay=False, extra_ratio=0.0,
                       update="rwr"),
}
# The layers a LoRA trains (module-name suffixes, the same in diffusers and ComfyUI's LDM UNets):
# the attention projections (HERO, DDPO), or those and the transformer blocks' feed-forward
# layers (linear layers only, so every LoRA loader reads them).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
TRAITS = ("guidance", "guided_policy", "reward", "reward_features", "encoder_replay",
          "extra_ratio", "update")


@dataclass
class HeroConfig:
    """Every HERO setting, with the official defaults (hero_spec section 2). The method's traits
    (``METHOD_TRAITS``) fill every trait left at ``None``; a trait given explicitly overrides it
    (the benchmark's ablations)."""
    method: str = "hero"           # a key of METHOD_TRAITS
    batch_size: int = 64
    steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0     # classifier-free guidance scale
    beta: float = 0.5               # best image ratio
    epsilon: float = 0.1            # noise perturbation
    fresh_ratio: float = 0.0        # not in HERO: share of each guided batch kept at N(0, I)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = "attention_ff"  # a key of LORA_TARGETS: the layers the LoRA trains
    feature_latent: str = "x0"      # x0 | t1 (the official code's latent)
    reward_mode: str = "similarity-to-best"   # | similarity-to-all-positive
    budget: int = 512               # feedback budget N_fb (marks)
    max_rounds: int = 100
    seed: int = 0
    keep_trajectories: bool = False
    # method traits (None = the method's, METHOD_TRAITS)
    guidance: Optional[bool] = None
    guided_policy: Optional[bool] = None
    reward: Optional[str] = None
    reward_features: Optional[str] = None
    encoder_replay: Optional[bool] = None
    extra_ratio: Optional[float] = None
    update: Optional[str] = None
    mark_credit: float = 0.25       # "marks+similarity": the within-class credit's range [0, c)
    extra_neighbours: int = 8       # marked neighbours that score an extra sample (k of the kNN)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)

    METHODS = tuple(METHOD_TRAITS)

    def __post_init__(self):
        for k, v in METHOD_TRAITS.get(self.method, {}).items():
            if getattr(self, k) is None:
                setattr(self, k, v)

    def extra_samples(self, batch: int) -> int:
        """M, the unmarked samples a round of ``batch`` marked images adds."""
        return int(round(self.extra_ratio * batch))

    @property
    def uses_encoder(self) -> bool:
        """Whether the method learns a representation from the marks."""
        return self.reward != "marks"

    def validate(self) -> "HeroConfig":
        if self.method not in self.METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {self.METHODS}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (a good and a bad image), "
                             f"got {self.batch_size}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.feature_latent not in ("x0", "t1"):
            raise ValueError("feature_latent must be 'x0' or 't1'")
        if self.reward_mode not in ("similarity-to-best", "similarity-to-all-positive"):
            raise ValueError(f"unknown reward_mode {self.reward_mode!r}")
        if self.reward_features not in ("trunk", "head"):
            raise ValueError("reward_features must be 'trunk' or 'head'")
        if self.reward not in ("similarity", "marks+similarity", "marks"):
            raise ValueError(f"reward must be 'similarity', 'marks+similarity' or 'marks', got "
                             f"{self.reward!r}")
        if self.update not in ("ppo", "d3po", "rwr"):
            raise ValueError(f"update must be 'ppo', 'd3po' or 'rwr', got {self.update!r}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"lora_targets must be one of {sorted(LORA_TARGETS)}, got "
                             f"{self.lora_targets!r}")
        if self.extra_ratio < 0:
            raise ValueError(f"extra_ratio must be 0 or more, got {self.extra_ratio}")
        if self.extra_ratio and not self.uses_encoder:
            raise ValueError("extra_ratio needs a learned representation to score the extra "
                             "samples; use a reward other than 'marks' or set extra_ratio to 0")
        if self.extra_neighbours < 1:
            raise ValueError("extra_neighbours must be at least 1")
        if not 0 <= self.mark_credit < 1:
            raise ValueError("mark_credit must lie in [0, 1) so that no bad image outranks a "
                             "good one")
        if self.lora_rank < 1:
            raise ValueError("lora_rank must be at least 1")
        if not 0 <= self.beta <= 1 or not 0 <= self.epsilon <= 1:
            raise ValueError("beta and epsilon must lie in [0, 1]")
        if not 0 <= self.fresh_ratio < 1:
            raise ValueError("fresh_ratio must lie in [0, 1)")
        self.policy.validate()
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "HeroConfig":
        d = dict(d)
        if "cfg" in d:   # written before the guidance scale was named guidance_scale
            d.setdefault("guidance_scale", d["cfg"])
            del d["cfg"]
        pol = PolicyConfig(**d.pop("policy", {}))
        rep = d.pop("representation", {})
        if "head_dims" in rep:
            rep["head_dims"] = tuple(rep["head_dims"])
        rep = RepresentationConfig(**rep)
        known = {f.name for f in dataclasses.fields(cls)}
        # written before the LoRA layer setting existed: those sessions trained attention only
        d.setdefault("lora_targets", "attention")
        if d.get("method") == "hero" and "reward" not in d:
            # written before the method traits existed: that "hero" was the paper's recipe
            d["method"] = "hero-paper"
        unknown = set(d) - known
        if unknown:
            raise SessionError(f"unknown config keys {sorted(unknown)}; this session was written "
                               f"by a newer ComfyUI-HERO, update the pack")
        return cls(**d, policy=pol, representation=rep).validate()


# ---- reading -------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SessionError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SessionDamaged(f"{path} is damaged ({e})", Path(path)) from None


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SessionError(f"missing file {path}") from None
    except Exception as e:  # truncated / corrupt pickle
        raise SessionDamaged(f"{path} is damaged or truncated ({type(e).__name__}: {e}); the "
                             f"session cannot continue from it", Path(path)) from None


def load_meta(path: Path) -> dict:
    """``<path>/session.json``, checked (format version)."""
    f = Path(path) / "session.json"
    meta = read_json(f)
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise SessionDamaged(f"{f} is not a HERO session file", f)
    if meta["format_version"] != FORMAT_VERSION:
        raise SessionError(
            f"{f} has format version {meta['format_version']}, this ComfyUI-HERO reads version "
            f"{FORMAT_VERSION}; use a matching pack version or start a new session id")
    # "labels_used" (the marks used) keeps its old name: stored sessions have it
    for key in ("session_id", "config", "next_round", "labels_used", "state_dir", "history"):
        if key not in meta:
            raise SessionDamaged(f"{f} is damaged (no '{key}')", f)
    return meta


def _state_folder_problem(d: Path, named_in: Optional[Path] = None) -> Optional[tuple[str, Path]]:
    """Why state folder ``d`` is not complete, naming the file; None if it is (sizes against its
    manifest; a folder from before manifests only has to exist)."""
    where = f" named in {named_in}" if named_in is not None else ""
    if not d.is_dir():
        return f"state folder {d}{where} is missing", d
    man = d / MANIFEST
    if not man.exists():
        return None
    try:
        files = json.loads(man.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return f"{man} is damaged", man
    for name, size in files.items():
        f = d / name
        if not f.is_file():
            return f"{f} is missing (state folder {d.name}{where})", f
        if f.stat().st_size != size:
            return (f"{f} is truncated or damaged ({f.stat().st_size} bytes, {size} were "
                    f"written)", f)
    return None


def complete_states(path: Path, verify: bool = False) -> list[dict]:
    """The state folders of a session that are complete and carry their session.json snapshot,
    newest first: [{"dir", "round", "meta"}]. ``verify`` also loads every file (slow)."""
    out = []
    for d in sorted(Path(path).glob("state-*"), reverse=True):
        if not STATE_RE.match(d.name) or not (d / MANIFEST).is_file():
            continue
        if _state_folder_problem(d) is not None:
            continue
        try:
            man = json.loads((d / MANIFEST).read_text())
            meta = man["meta"]
            if meta.get("state_dir") != d.name or meta.get("format_version") != FORMAT_VERSION:
                continue
            if verify:
                for name in man["files"]:
                    torch_load(d / name)
        except (OSError, ValueError, KeyError, TypeError, SessionError):
            continue
        out.append({"dir": d.name, "round": int(man["round"]), "meta": meta})
    return out


def _offer(path: Path) -> str:
    """What repair would restore, for error messages."""
    path = Path(path)
    try:
        meta = load_meta(path)
    except SessionError:
        meta = None
    cur = None if meta is None else meta.get("state_dir")
    states = [c for c in complete_states(path) if c["dir"] != cur or meta is None]
    if meta is None and states:
        c = states[0]
        what = (f"repair rebuilds session.json from {c['dir']}/{MANIFEST} (the state after "
                f"round {c['round']})")
    elif meta is None and (path / INIT_META).is_file():
        what = f"repair rebuilds session.json from {INIT_META} (learning restarts at round 0)"
    elif meta is None:
        return ("no copy to rebuild session.json from is left; start a new session (the rounds "
                "folder keeps every image and mark)")
    elif states:
        c = states[0]
        what = (f"the last complete state is {c['dir']} (after round {c['round']}): repair "
                f"returns to it and round {c['round'] + 1} is trained again from its saved marks")
    else:
        what = ("no complete learned state is left: repair restarts learning at round 0 and "
                "keeps every round's images and marks (rounds that cannot be trained again go to "
                "rounds-archive/)")
    return f"{what}. Run: {repair_command(path)}  (or set HERO Session's 'repair' option)"


# ---- the session -----------------------------------------------------------------------------

@dataclass
class BestRecord:
    round: int
    index: int
    score: Optional[float] = None  # the simulated evaluator's score, when one is used


class Session:
    """Open with ``Session.open(path)``, create with ``Session.create(path, config)``."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self._meta = meta
        self.config = HeroConfig.from_json(meta["config"])
        self._lock = FolderLock(self.path, LOCK_NAME)

    # -- lifecycle
    @classmethod
    def create(cls, path: str | Path, config: HeroConfig, session_id: Optional[str] = None,
               info: Optional[dict] = None) -> "Session":
        path = Path(path)
        sid = valid_session_id(session_id or path.name)
        config.validate()
        path.mkdir(parents=True, exist_ok=True)
        with FolderLock(path, LOCK_NAME):
            if (path / "session.json").exists():
                raise SessionError(f"a session already exists at {path}; open it instead")
            # "labels_used": the marks used (the key keeps its old name for stored sessions)
            meta = {"format_version": FORMAT_VERSION, "session_id": sid, "created": time.time(),
                    "config": config.to_json(), "next_round": 0, "labels_used": 0, "best": None,
                    "state_dir": None, "prev_state_dir": None, "info": info or {},
                    "history": []}
            atomic_write_json(path / INIT_META, meta)
            atomic_write_json(path / "session.json", meta)
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | Path, cleanup: bool = True) -> "Session":
        """Open an existing session. A damaged one raises :class:`SessionDamaged` naming the file
        and the state ``python -m hero_engine repair`` would go back to. ``cleanup``: delete what
        killed writers left (temp files, state folders no pointer names); the panel's read-only
        views pass False."""
        path = Path(path)
        if not (path / "session.json").is_file():
            if path.is_dir() and ((path / INIT_META).is_file() or any(path.glob("state-*"))
                                  or (path / "rounds").is_dir()):
                raise SessionDamaged(f"missing file {path / 'session.json'}; "
                                     f"{_offer(path)}", path / "session.json")
            raise SessionError(f"missing file {path / 'session.json'}")
        with FolderLock(path, LOCK_NAME):
            try:
                meta = load_meta(path)
            except SessionDamaged as e:
                raise SessionDamaged(f"{e}; {_offer(path)}", e.path) from None
            s = cls(path, meta)
            problem = s.state_problem()
            if problem is not None:
                raise SessionDamaged(f"{problem[0]}; {_offer(path)}", problem[1])
            if cleanup:
                s.clean_leftovers()
        return s

    @classmethod
    def open_or_create(cls, path: str | Path, config: HeroConfig, **kw) -> "Session":
        path = Path(path)
        if (path / "session.json").exists():
            return cls.open(path)
        return cls.create(path, config, **kw)

    # -- the lock and read-modify-write of session.json
    def locked(self) -> FolderLock:
        """``with session.locked():`` -- the session lock (re-entrant; threads and processes).
        Hold it to read the state consistently or to change several things at once."""
        return self._lock

    def refresh(self) -> "Session":
        """Re-read ``session.json`` (another thread or process may have committed a round)."""
        with self._lock:
            self._meta = load_meta(self.path)
        return self

    def _update_meta(self, change) -> dict:
        """Under the lock: read session.json as it is on disk, apply ``change(meta)``, write it
        back. Nothing this object read earlier is published, only the change."""
        with self._lock:
            meta = load_meta(self.path)
            change(meta)
            atomic_write_json(self.path / "session.json", meta)
            self._meta = meta
            return meta

    # -- properties
    @property
    def session_id(self) -> str:
        return self._meta["session_id"]

    @property
    def round(self) -> int:
        """Index of the round in progress (the first round not yet completed)."""
        return self._meta["next_round"]

    @property
    def marks_used(self) -> int:
        """Images marked so far (session.json's ``labels_used``: the key keeps its old name for
        stored sessions)."""
        return self._meta["labels_used"]

    @property
    def budget_left(self) -> int:
        return max(0, self.config.budget - self.marks_used)

    @property
    def done(self) -> bool:
        return self.marks_used >= self.config.budget or self.round >= self.config.max_rounds

    @property
    def best(self) -> Optional[BestRecord]:
        b = self._meta["best"]
        return None if b is None else BestRecord(**b)

    @property
    def info(self) -> dict:
        return self._meta.get("info", {})

    @property
    def state_dir(self) -> Optional[Path]:
        d = self._meta["state_dir"]
        return None if d is None else self.path / d

    @property
    def history(self) -> list[dict]:
        """Per-round metrics of the completed rounds."""
        return list(self._meta["history"])

    def round_dir(self, round_idx: int) -> Path:
        return self.path / "rounds" / f"{round_idx:04d}"

    def image_path(self, round_idx: int, i: int) -> Path:
        return self.round_dir(round_idx) / "images" / f"{i:03d}.png"

    def best_image_path(self) -> Optional[Path]:
        b = self.best
        return None if b is None else self.image_path(b.round, b.index)

    @property
    def prev_state_dir(self) -> Optional[Path]:
        d = self._meta.get("prev_state_dir")
        return None if d is None else self.path / d

    def update_info(self, **kw) -> None:
        """Set keys of ``info`` (read-modify-write of session.json under the session lock)."""
        self._update_meta(lambda m: m.setdefault("info", {}).update(kw))

    def record_timing(self, **seconds: float) -> None:
        """Remember how long the last round's phases took (``generate_seconds``,
        ``train_seconds``, ...) in ``info.timing``: what ``next_batch_eta`` estimates from."""
        clean = {k: round(float(v), 3) for k, v in seconds.items() if v is not None}
        self._update_meta(lambda m: m.setdefault("info", {}).setdefault("timing", {}).update(clean))

    def next_batch_eta(self) -> dict:
        """How long the person waits after submitting marks: the last round's training plus the
        last batch's generation (``None`` where that phase has not run yet in this session).
        ``{"train_seconds", "generate_seconds", "seconds"}``, ``seconds`` their sum when both are
        known."""
        t = self.info.get("timing", {})
        tr, gen = t.get("train_seconds"), t.get("generate_seconds")
        return {"train_seconds": tr, "generate_seconds": gen,
                "seconds": None if tr is None or gen is None else tr + gen}

    def record_export(self, file: str, **extra) -> dict:
        """Record an exported file as ``info.last_export`` {file, round, time, ...}."""
        rec = {"file": file, "round": self.round, "time": time.time(), **extra}
        with self._lock:
            self.refresh()
            rec["round"] = self.round
            self.update_info(last_export=rec)
        return rec

    def export_state(self, write, names: tuple = ("lora",)) -> dict:
        """Export under the session lock: ``write(state, session) -> {"file": ..., ...}`` gets the
        named files of the current state (loaded only those: the encoder is 128 MB) and this
        session, refreshed; the result is recorded as ``info.last_export``. A round commit waits
        until the export is written, so the file always matches the recorded round."""
        with self._lock:
            self.refresh()
            st = self.load_state(names)
            res = write(st, self)
            rec = self.record_export(str(res["file"]))
            return {**res, "round": rec["round"], "last_export": rec}

    # -- generation
    def save_generated(self, round_idx: int, noises: torch.Tensor, traj, features: torch.Tensor,
                       images: torch.Tensor, meta: dict) -> None:
        """Store the round's batch before anybody marks it. ``images``: [B, 3, H, W] in [0, 1]."""
        if round_idx != self.round:
            raise SessionError(f"round {round_idx} is not the round in progress ({self.round})")
        if self.marks_for(round_idx) is not None:
            raise SessionError(f"round {round_idx} was already generated and marked; train it "
                               f"before generating a new batch")
        d = self.round_dir(round_idx)
        (d / "images").mkdir(parents=True, exist_ok=True)
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255
               ).round().astype(np.uint8)
        for i, a in enumerate(arr):
            buf = _png_bytes(a)
            atomic_write_bytes(self.image_path(round_idx, i), buf)
        atomic_torch_save(d / "generated.pt", {
            "noises": noises.detach().cpu(), "latents": traj.latents.detach().cpu().half(),
            "log_probs": traj.log_probs.detach().cpu(), "timesteps": traj.schedule.timesteps,
            "alpha_bars": traj.schedule.alpha_bars, "eta": traj.eta,
            "features": features.detach().cpu().float(),
            # the final latents outlive the chain (reward-weighted denoising replays them); with
            # x0 features they are the features
            **({} if self.config.feature_latent == "x0" else {"x0": traj.x0.detach().cpu().half()})})
        atomic_write_json(d / "meta.json", {**meta, "size": int(noises.shape[0]),
                                            "time": time.time()})

    def pending(self) -> Optional[dict]:
        """The round in progress if its batch has been generated: its meta (and marks if any)."""
        d = self.round_dir(self.round)
        if not (d / "meta.json").exists() or not (d / "generated.pt").exists():
            return None
        m = read_json(d / "meta.json")
        return {"round": self.round, "meta": m, "marks": self.marks_for(self.round)}

    def load_generated(self, round_idx: int) -> dict:
        return torch_load(self.round_dir(round_idx) / "generated.pt")

    def round_meta(self, round_idx: int) -> dict:
        return read_json(self.round_dir(round_idx) / "meta.json")

    # -- marks
    def record_marks(self, round_idx: int, marks: Marks) -> Marks:
        """Validate and store the round's marks (atomic + fsync). Marks are written once: a second
        answer for the same round raises ``SessionError`` (the caller reports 409)."""
        if round_idx != self.round:
            raise SessionError(f"round {round_idx} is not the round waiting for marks (round "
                               f"{self.round} is); the request is stale")
        p = self.round_dir(round_idx) / "meta.json"
        if not p.exists():
            raise SessionError(f"round {round_idx} has no generated batch to mark")
        n = read_json(p)["size"]
        marks.validate(n, self.best is not None)
        mp = self.round_dir(round_idx) / "marks.json"
        if mp.exists():
            raise SessionError(f"round {round_idx} already has marks; they are kept as first saved")
        atomic_write_json(mp, {**marks.to_json(), "time": time.time()})
        return marks

    def marks_for(self, round_idx: int) -> Optional[Marks]:
        p = self.round_dir(round_idx) / "marks.json"
        if not p.exists():
            return None
        d = read_json(p)
        try:
            return Marks.from_json(d)
        except MarksError as e:
            raise SessionError(f"{p} is damaged: {e}") from None

    def marked_history(self, round_idx: int, what: str = "features"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature latents (``what="x0"``: final latents) [N, C, H, W] and marks [N] (1 good /
        0 bad) of rounds 0..round_idx-1, in order: the replay set of the representation network and of
        reward-weighted denoising. A round whose latents or marks are gone is left out."""
        feats, labels = [], []
        for earlier in range(round_idx):
            m = self.marks_for(earlier)
            p = self.round_dir(earlier) / "generated.pt"
            if m is None or not p.exists():
                continue
            data = torch_load(p)
            f = data.get("features") if what == "features" else data.get(
                "x0", data.get("features") if self.config.feature_latent == "x0" else None)
            if f is None:
                continue
            y = torch.zeros(len(f))
            y[list(m.good)] = 1.0
            feats.append(f.float())
            labels.append(y)
        if not feats:
            return torch.zeros((0,)), torch.zeros((0,))
        return torch.cat(feats), torch.cat(labels)

    # -- learned state
    def load_state(self, names: Optional[tuple] = None) -> dict:
        """The learned state after the last completed round ({} before the first); ``names``:
        only these files (e.g. ``("lora",)``). Read under the session lock from the state
        folder session.json names now, so a concurrent commit cannot delete it mid-read."""
        with self._lock:
            self._meta = load_meta(self.path)
            d = self.state_dir
            if d is None:
                return {}
            if not d.is_dir():
                raise SessionDamaged(f"state folder {d} named in {self.path / 'session.json'} is "
                                     f"missing; {_offer(self.path)}", d)
            out = {}
            for name in (STATE_FILES if names is None else names):
                p = d / f"{name}.pt"
                if p.exists():
                    out[name] = torch_load(p)
            return out

    def load_lora(self, state: Optional[dict] = None, family: Optional[str] = None,
                  alpha: Optional[float] = None) -> Optional[LoraState]:
        """The session's LoRA (module names, kohya names, family, fp32 tensors) after the last
        completed round; None before the first. ``state``: the learned state if the caller has
        loaded it. Sessions from older versions stored it without its layout
        (``lora.read_session_lora``): the ComfyUI adapter's form is read with the layout
        session.json recorded (``info.lora_layout``), the diffusers backend's with ``family``
        and ``alpha`` (default the config's)."""
        st = self.load_state(("lora",)) if state is None else state
        tensors = st.get("lora")
        if tensors is None:
            return None
        layout = self.info.get("lora_layout") or {}
        return read_session_lora(tensors, family=family or layout.get("family"),
                                 kohya_names=layout.get("kohya"), base_model=layout.get("model", ""),
                                 alpha=self.config.lora_alpha if alpha is None else alpha)

    def state_problem(self) -> Optional[tuple[str, Path]]:
        """(what is wrong, the file) if the state folder session.json names is missing or does
        not hold what its manifest lists; None if it is sound (cheap: sizes only)."""
        d = self.state_dir
        if d is None:
            return None
        return _state_folder_problem(d, self.path / "session.json")

    def clean_leftovers(self, commit_lock_held: bool = False) -> list[str]:
        """Delete what killed writers left: temp files of atomic writes nobody is writing, and
        state folders no pointer names (a commit killed before its pointer flip, a folder whose
        deletion was cut short) -- only while no commit is in progress in any process."""
        removed: list[str] = []
        with self._lock:
            self._meta = load_meta(self.path)
            keep = {self._meta.get("state_dir"), self._meta.get("prev_state_dir")} - {None}
            commit = FolderLock(self.path, COMMIT_LOCK_NAME)
            if commit_lock_held or commit.acquire(blocking=False, reentrant=False):
                try:
                    for p in sorted(self.path.iterdir()):
                        orphan = ((STATE_RE.match(p.name) and p.name not in keep)
                                  or (p.name.startswith(".state-") and p.name.endswith(TEMP_SUFFIX)))
                        if orphan and p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p, ignore_errors=True)
                            removed.append(p.name)
                finally:
                    if not commit_lock_held:
                        commit.release()
        removed += [str(p.relative_to(self.path)) for p in remove_stale_temps(self.path)]
        if removed:
            import logging
            logging.getLogger("HERO").info("HERO: session %s: removed leftovers of an interrupted "
                                           "write: %s", self.session_id, ", ".join(removed))
        return removed

    def complete_round(self, round_idx: int, state: dict, metrics: dict, best: Optional[BestRecord],
                       num_marked: int) -> None:
        """Write the state after round ``round_idx`` into a new folder, then flip the pointer
        atomically.

        Order (docs/session_store.md): under the commit lock, write the files into a temp folder
        ``.state-NNNN.*.tmp`` with a manifest; under the session lock, re-read session.json, check
        the round is still in progress, rename the folder to ``state-NNNN``, write session.json
        (fsync'd: the pointer is durable), and only then delete the state folder that is now
        neither the current nor the previous one."""
        with FolderLock(self.path, COMMIT_LOCK_NAME):
            self._check_in_progress(round_idx)
            name = f"state-{round_idx + 1:04d}"
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=self.path))
            try:
                files = {}
                for key, obj in state.items():
                    atomic_torch_save(tmp / f"{key}.pt", obj)
                    files[f"{key}.pt"] = (tmp / f"{key}.pt").stat().st_size
                atomic_write_json(self.round_dir(round_idx) / "metrics.json", metrics)
                with self._lock:
                    meta = self._check_in_progress(round_idx)
                    cur, prev = meta.get("state_dir"), meta.get("prev_state_dir")
                    # "labels_used": the marks used (old key name, as stored sessions have it)
                    meta.update(next_round=round_idx + 1,
                                labels_used=meta["labels_used"] + num_marked,
                                best=None if best is None else dataclasses.asdict(best),
                                state_dir=name, prev_state_dir=cur,
                                history=list(meta["history"]) + [metrics])
                    atomic_write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION,
                                                       "round": round_idx, "files": files,
                                                       "meta": meta})
                    fsync_dir(tmp)
                    final = self.path / name
                    if final.exists():  # a commit of this round killed before its pointer flip
                        shutil.rmtree(final)
                    os.replace(tmp, final)
                    fsync_dir(self.path)
                    atomic_write_json(self.path / "session.json", meta)  # durable pointer
                    self._meta = meta
                    for old in (prev,):  # now named by no pointer
                        if old is not None and old not in (name, cur):
                            shutil.rmtree(self.path / old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if not self.config.keep_trajectories and round_idx >= 1:
            # repair can go back one round (to the previous state): this round's trajectory stays
            # until the next one is committed; the previous round's bulky chain is no longer needed
            self._drop_trajectory(round_idx - 1)

    def _check_in_progress(self, round_idx: int) -> dict:
        with self._lock:
            meta = load_meta(self.path)
            self._meta = meta
        if meta["next_round"] != round_idx:
            raise SessionError(f"cannot complete round {round_idx}: round {meta['next_round']} is "
                               f"in progress (another process committed it?)")
        return meta

    def _drop_trajectory(self, round_idx: int) -> None:
        g = self.round_dir(round_idx) / "generated.pt"
        if not g.is_file():
            return
        try:
            data = torch_load(g)
        except SessionError:
            return
        if "latents" not in data and "log_probs" not in data:
            return
        # keep what the history and the best record need; drop the bulky chain
        data.pop("latents", None)
        data.pop("log_probs", None)
        atomic_torch_save(g, data)

    def summary(self) -> dict:
        """What the session panel shows."""
        # "labels_used" keeps its old name: the front end (web/js) reads it
        return {"session_id": self.session_id, "round": self.round, "labels_used": self.marks_used,
                "budget": self.config.budget, "best": self._meta["best"],
                "history": self.history, "info": self.info, "pending": self.pending() is not None}


def _png_bytes(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
