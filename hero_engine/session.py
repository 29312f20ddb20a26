"""A HERO session on disk: config, rounds, marks, noises, LoRA / encoder / optimizer state, metrics.

Layout (every file written atomically: temp file + fsync + rename)::

    <dir>/session.json            format, id, config, next round, labels used, best record, state dir
    <dir>/rounds/0003/            one folder per round
        generated.pt              x_T noises, trajectory (latents, log-probs, schedule), features
        meta.json                 prompts, size, seeds, centre ids, time
        images/000.png ...        the decoded batch (what the person marked)
        marks.json                the marks, written before the marks API answers "saved"
        metrics.json              written when the round is trained
    <dir>/state-0004/             the learned state after round 3: lora.pt, policy_opt.pt,
                                  encoder.pt, best.pt, pool.pt

A round is *completed* when ``session.json`` points at the state folder written after it: the
pointer flips in one atomic rename, so a kill at any moment leaves the previous complete state, and
a re-opened session continues at the first round not completed, with every saved mark.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from .feedback import Marks, MarksError
from .fileio import atomic_torch_save, atomic_write_bytes, atomic_write_json, fsync_dir
from .policy import PolicyConfig
from .representation import RepresentationConfig

__all__ = ["HeroConfig", "Session", "SessionError", "FORMAT_VERSION", "valid_session_id"]

FORMAT_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SessionError(RuntimeError):
    """A session folder that cannot be used as it is; the message names the file and the fix."""


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
#   update          "ppo" (DDPO's clipped objective) or "d3po"
METHOD_TRAITS: dict[str, dict] = {
    "hero": dict(guidance=True, guided_policy=True, reward="marks+similarity",
                 reward_features="head", encoder_replay=True, extra_ratio=0.0, update="ppo"),
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
    cfg: float = 5.0
    beta: float = 0.5               # best image ratio
    epsilon: float = 0.1            # noise perturbation
    fresh_ratio: float = 0.0        # not in HERO: share of each guided batch kept at N(0, I)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    feature_latent: str = "x0"      # x0 | t1 (the official code's latent)
    reward_mode: str = "similarity-to-best"   # | similarity-to-all-positive
    budget: int = 512               # feedback budget N_fb (labels)
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
        if self.update not in ("ppo", "d3po"):
            raise ValueError(f"update must be 'ppo' or 'd3po', got {self.update!r}")
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
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "HeroConfig":
        d = dict(d)
        pol = PolicyConfig(**d.pop("policy", {}))
        rep = d.pop("representation", {})
        if "head_dims" in rep:
            rep["head_dims"] = tuple(rep["head_dims"])
        rep = RepresentationConfig(**rep)
        known = {f.name for f in dataclasses.fields(cls)}
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SessionError(f"{path} is damaged ({e}); restore it from a backup or start a new "
                           f"session (the rounds folder keeps every image and mark)") from None


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SessionError(f"missing file {path}") from None
    except Exception as e:  # truncated / corrupt pickle
        raise SessionError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); the "
                           f"session cannot continue from it") from None


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

    # -- lifecycle
    @classmethod
    def create(cls, path: str | Path, config: HeroConfig, session_id: Optional[str] = None,
               info: Optional[dict] = None) -> "Session":
        path = Path(path)
        sid = valid_session_id(session_id or path.name)
        if (path / "session.json").exists():
            raise SessionError(f"a session already exists at {path}; open it instead")
        config.validate()
        meta = {"format_version": FORMAT_VERSION, "session_id": sid, "created": time.time(),
                "config": config.to_json(), "next_round": 0, "labels_used": 0, "best": None,
                "state_dir": None, "info": info or {}, "history": []}
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / "session.json", meta)
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | Path) -> "Session":
        path = Path(path)
        meta = read_json(path / "session.json")
        if not isinstance(meta, dict) or "format_version" not in meta:
            raise SessionError(f"{path / 'session.json'} is not a HERO session file")
        if meta["format_version"] != FORMAT_VERSION:
            raise SessionError(
                f"{path / 'session.json'} has format version {meta['format_version']}, this "
                f"ComfyUI-HERO reads version {FORMAT_VERSION}; use a matching pack version or "
                f"start a new session id")
        s = cls(path, meta)
        if s.state_dir is not None and not s.state_dir.is_dir():
            raise SessionError(f"state folder {s.state_dir} named in session.json is missing")
        return s

    @classmethod
    def open_or_create(cls, path: str | Path, config: HeroConfig, **kw) -> "Session":
        path = Path(path)
        if (path / "session.json").exists():
            return cls.open(path)
        return cls.create(path, config, **kw)

    def _save_meta(self) -> None:
        atomic_write_json(self.path / "session.json", self._meta)

    # -- properties
    @property
    def session_id(self) -> str:
        return self._meta["session_id"]

    @property
    def round(self) -> int:
        """Index of the round in progress (the first round not yet completed)."""
        return self._meta["next_round"]

    @property
    def labels_used(self) -> int:
        return self._meta["labels_used"]

    @property
    def budget_left(self) -> int:
        return max(0, self.config.budget - self.labels_used)

    @property
    def done(self) -> bool:
        return self.labels_used >= self.config.budget or self.round >= self.config.max_rounds

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

    def round_dir(self, k: int) -> Path:
        return self.path / "rounds" / f"{k:04d}"

    def image_path(self, k: int, i: int) -> Path:
        return self.round_dir(k) / "images" / f"{i:03d}.png"

    def best_image_path(self) -> Optional[Path]:
        b = self.best
        return None if b is None else self.image_path(b.round, b.index)

    def update_info(self, **kw) -> None:
        self._meta.setdefault("info", {}).update(kw)
        self._save_meta()

    # -- generation
    def save_generated(self, k: int, noises: torch.Tensor, traj, features: torch.Tensor,
                       images: torch.Tensor, meta: dict) -> None:
        """Store round k's batch before anybody marks it. ``images``: [B, 3, H, W] in [0, 1]."""
        if k != self.round:
            raise SessionError(f"round {k} is not the round in progress ({self.round})")
        if self.marks_for(k) is not None:
            raise SessionError(f"round {k} was already generated and marked; train it before "
                               f"generating a new batch")
        d = self.round_dir(k)
        (d / "images").mkdir(parents=True, exist_ok=True)
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255
               ).round().astype(np.uint8)
        for i, a in enumerate(arr):
            buf = _png_bytes(a)
            atomic_write_bytes(self.image_path(k, i), buf)
        atomic_torch_save(d / "generated.pt", {
            "noises": noises.detach().cpu(), "latents": traj.latents.detach().cpu().half(),
            "log_probs": traj.log_probs.detach().cpu(), "timesteps": traj.schedule.timesteps,
            "alpha_bars": traj.schedule.alpha_bars, "eta": traj.eta,
            "features": features.detach().cpu().float()})
        atomic_write_json(d / "meta.json", {**meta, "size": int(noises.shape[0]),
                                            "time": time.time()})

    def pending(self) -> Optional[dict]:
        """The round in progress if its batch has been generated: its meta (and marks if any)."""
        d = self.round_dir(self.round)
        if not (d / "meta.json").exists() or not (d / "generated.pt").exists():
            return None
        m = read_json(d / "meta.json")
        return {"round": self.round, "meta": m, "marks": self.marks_for(self.round)}

    def load_generated(self, k: int) -> dict:
        return torch_load(self.round_dir(k) / "generated.pt")

    def round_meta(self, k: int) -> dict:
        return read_json(self.round_dir(k) / "meta.json")

    # -- marks
    def record_marks(self, k: int, marks: Marks) -> Marks:
        """Validate and store round k's marks (atomic + fsync). Marks are written once: a second
        answer for the same round raises ``SessionError`` (the caller reports 409)."""
        if k != self.round:
            raise SessionError(f"round {k} is not the round waiting for marks (round {self.round}"
                               f" is); the request is stale")
        p = self.round_dir(k) / "meta.json"
        if not p.exists():
            raise SessionError(f"round {k} has no generated batch to mark")
        n = read_json(p)["size"]
        marks.validate(n, self.best is not None)
        mp = self.round_dir(k) / "marks.json"
        if mp.exists():
            raise SessionError(f"round {k} already has marks; they are kept as first saved")
        atomic_write_json(mp, {**marks.to_json(), "time": time.time()})
        return marks

    def marks_for(self, k: int) -> Optional[Marks]:
        p = self.round_dir(k) / "marks.json"
        if not p.exists():
            return None
        d = read_json(p)
        try:
            return Marks.from_json(d)
        except MarksError as e:
            raise SessionError(f"{p} is damaged: {e}") from None

    def marked_history(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature latents [N, C, H, W] and marks [N] (1 good / 0 bad) of rounds 0..k-1, in
        order: the replay set of the representation network. A round whose features or marks
        are gone is left out."""
        feats, labels = [], []
        for j in range(k):
            m = self.marks_for(j)
            p = self.round_dir(j) / "generated.pt"
            if m is None or not p.exists():
                continue
            f = torch_load(p).get("features")
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
    def load_state(self) -> dict:
        """The learned state after the last completed round ({} before the first)."""
        d = self.state_dir
        if d is None:
            return {}
        out = {}
        for name in ("lora", "policy_opt", "encoder", "best", "pool"):
            p = d / f"{name}.pt"
            if p.exists():
                out[name] = torch_load(p)
        return out

    def complete_round(self, k: int, state: dict, metrics: dict, best: Optional[BestRecord],
                       labels: int) -> None:
        """Write the state after round k into a new folder, then flip the pointer atomically."""
        if k != self.round:
            raise SessionError(f"cannot complete round {k}: round {self.round} is in progress")
        new = self.path / f"state-{k + 1:04d}"
        if new.exists():
            shutil.rmtree(new)
        new.mkdir(parents=True)
        for name, obj in state.items():
            atomic_torch_save(new / f"{name}.pt", obj)
        fsync_dir(new)
        atomic_write_json(self.round_dir(k) / "metrics.json", metrics)
        old = self.state_dir
        meta = dict(self._meta)
        meta.update(next_round=k + 1, labels_used=self.labels_used + labels,
                    best=None if best is None else dataclasses.asdict(best),
                    state_dir=new.name, history=self._meta["history"] + [metrics])
        self._meta = meta
        self._save_meta()
        if old is not None and old != new and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        if not self.config.keep_trajectories:
            g = self.round_dir(k) / "generated.pt"
            data = torch_load(g)
            # keep what the history and the best record need; drop the bulky chain
            data.pop("latents", None)
            data.pop("log_probs", None)
            atomic_torch_save(g, data)

    def summary(self) -> dict:
        """What the session panel shows."""
        return {"session_id": self.session_id, "round": self.round, "labels_used": self.labels_used,
                "budget": self.config.budget, "best": self._meta["best"],
                "history": self.history, "info": self.info, "pending": self.pending() is not None}


def _png_bytes(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
