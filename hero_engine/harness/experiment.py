"""A whole simulated HERO session on the toy model: the demo and the benchmark share it.

Success is always measured on *fresh* N(0, I) samples of the current LoRA model with fixed
evaluation seeds (hero_spec 11.11), never on the feedback-guided training batches.
"""
from __future__ import annotations

import argparse
import json
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import loop
from ..backends import DiffusersBackend
from ..policy import PolicyConfig
from ..representation import RepresentationConfig
from ..session import LORA_TARGETS, HeroConfig, Session
from .evaluator import SimulatedEvaluator

__all__ = ["ExperimentSpec", "toy_backend", "toy_config", "evaluate", "run_experiment",
           "diversity", "TOY_LR", "toy_lr", "add_runtime_args", "apply_runtime_args"]


def add_runtime_args(ap: argparse.ArgumentParser) -> None:
    """--device and --threads, shared by demo and bench."""
    ap.add_argument("--device", default="auto", help="auto: the GPU when there is one")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's choice; use 1 on a busy machine)")


def apply_runtime_args(a: argparse.Namespace) -> str:
    """Set the thread count; return the device to run on."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return a.device


@dataclass
class ExperimentSpec:
    task: str = "colour"
    method: str = "hero"
    rounds: int = 8
    batch_size: int = 64
    seed: int = 0
    eval_n: int = 128             # fresh samples for the first and the last measurement
    eval_n_mid: Optional[int] = None  # fresh samples for the measurements in between (default eval_n)
    eval_seed: int = 10_000
    eval_every: int = 1           # measure success after every k rounds (0: only first and last)
    steps: Optional[int] = None   # default: the toy model's
    guidance_scale: Optional[float] = None   # CFG scale; default: the toy model's
    ppo_timesteps: int = 5        # timesteps trained per sample (PolicyConfig.timesteps_per_sample)
    # samples per backward pass; gradient accumulation keeps the official 8 samples per AdamW
    # step (2 x 4), so a larger value computes the same update in fewer, faster passes on a CPU
    ppo_batch: int = 2
    lr: float = 1e-2              # the toy-scale PPO rate; toy_lr(method) gives each method's
    encoder_epochs: int = 200
    encoder_lr: float = 1e-5      # official (the bench's rate: docs/benchmarks.md, bench scale)
    # the official encoder (2048 -> 2048/1024/512) is sized for 4x64x64 SD latents; the toy's
    # small images get a 4x narrower one so a round fits the CPU demo budget
    encoder_trunk: int = 512
    encoder_head: tuple = (512, 256, 128)
    reward_features: Optional[str] = None   # None: the method's (METHOD_TRAITS)
    score_fn: Optional[Callable[[Tensor, list], Tensor]] = None   # custom evaluator
    threshold: Optional[float] = None
    flip_rate: float = 0.0        # simulated person: chance that a good/bad mark is wrong
    prompt: Optional[str] = None
    hero: dict = field(default_factory=dict)   # other HeroConfig fields (beta, epsilon, traits)
    label: Optional[str] = None   # the name results are filed under (default: method)

    @property
    def name(self) -> str:
        return self.label or self.method


def toy_backend(spec: ExperimentSpec, device="cpu"):
    from ..toy import TASKS, load_toy_model
    toy = load_toy_model(device=device)
    task = TASKS.get(spec.task)
    prompt = spec.prompt or (task.prompt if task else None)
    if prompt is None:
        raise ValueError(f"unknown task {spec.task!r}: choose one of {sorted(TASKS)} or give "
                         f"--prompt with --evaluator")
    scale = spec.guidance_scale if spec.guidance_scale is not None else toy.default_guidance_scale
    be = DiffusersBackend(toy.unet, toy.encode_prompts, toy.decode, toy.alphas_cumprod,
                          toy.latent_shape, [prompt], guidance_scale=scale, rank=4, alpha=4.0,
                          family="toy", device=device, lora_seed=spec.seed,
                          targets=LORA_TARGETS[HeroConfig(method=spec.method, **{
                              k: v for k, v in spec.hero.items() if "." not in k}).lora_targets])
    return toy, task, be


# The LoRA learning rate at toy scale, per update rule (the SD defaults are in PolicyConfig); the
# rates tried and why these were kept: docs/benchmarks.md, "Bench scale".
TOY_LR = {"ppo": 1e-2, "d3po": 1e-3, "rwr": 1e-3}


def toy_lr(method: str, overrides: Optional[dict] = None) -> float:
    """The toy-scale LoRA learning rate of a method (variant): TOY_LR of its update rule."""
    over = {k: v for k, v in (overrides or {}).items() if "." not in k}
    return TOY_LR[HeroConfig(method=method, **over).update]


# the official samples per AdamW step (train batch 2 x grad accumulation 4)
_SAMPLES_PER_STEP = PolicyConfig.train_batch_size * PolicyConfig.grad_accum


def toy_config(spec: ExperimentSpec, steps: int, guidance_scale: float) -> HeroConfig:
    extra = {k: v for k, v in spec.hero.items() if "." not in k}
    sub = {"policy": {}, "representation": {}}
    for k, v in spec.hero.items():     # "policy.clip_range" etc.: the nested settings
        if "." in k:
            part, name = k.split(".", 1)
            sub[part][name] = v
    if spec.reward_features is not None:
        extra["reward_features"] = spec.reward_features
    return HeroConfig(method=spec.method, batch_size=spec.batch_size, steps=steps,
                      guidance_scale=guidance_scale,
                      budget=spec.rounds * spec.batch_size,
                      max_rounds=spec.rounds, seed=spec.seed,
                      policy=PolicyConfig(**{
                          "lr": spec.lr, "timesteps_per_sample": spec.ppo_timesteps,
                          "train_batch_size": spec.ppo_batch,
                          "grad_accum": max(1, _SAMPLES_PER_STEP // spec.ppo_batch),
                          **sub["policy"]}),
                      representation=RepresentationConfig(**{
                          "epochs": spec.encoder_epochs, "lr": spec.encoder_lr,
                          "trunk_dim": spec.encoder_trunk, "head_dims": tuple(spec.encoder_head),
                          **sub["representation"]}),
                      **extra).validate()


def evaluate(be: DiffusersBackend, score_fn, threshold: float, n: int, steps: int, seed: int,
             prompt: str) -> dict:
    imgs = be.sample_fresh(n, steps, seed)
    scores = score_fn(imgs, [prompt] * n).float()
    return {"success": (scores >= threshold).float().mean().item(),
            "diversity": diversity(imgs), "images": imgs}


def diversity(images: Tensor, max_n: int = 128) -> float:
    """Mean pairwise RMS pixel distance of the samples (0 = all identical)."""
    x = images[:max_n].flatten(1).float()
    d = torch.cdist(x, x) / x.shape[1] ** 0.5
    n = len(x)
    return (d.sum() / max(1, n * (n - 1))).item()


_BASE_EVALS: dict = {}


def run_experiment(spec: ExperimentSpec, out_dir: Path, device="cpu",
                   log: Callable[[str], None] = print, save_grids: bool = True,
                   export: bool = False) -> dict:
    """Run ``spec.rounds`` HERO rounds with a simulated evaluator; return every measurement."""
    from ..drawing import image_grid
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    toy, task, be = toy_backend(spec, device)
    steps = spec.steps or toy.default_steps
    score_fn = spec.score_fn or task.score
    threshold = spec.threshold if spec.threshold is not None else task.threshold
    prompt = be.prompts[0]
    tag = re.sub(r"[^A-Za-z0-9_-]", "_", f"{spec.task}-{spec.name}-f{spec.flip_rate:g}-s{spec.seed}")
    if len(tag) > 56:   # a session id has at most 64 characters: a long variant name is hashed
        tag = f"{tag[:40]}-{zlib.crc32(tag.encode()):08x}"
    sess_dir = out_dir / f"session-{tag}"
    if sess_dir.exists():
        import shutil
        shutil.rmtree(sess_dir)
    t_start, cpu_start, eval_seconds = time.time(), time.process_time(), [0.0]
    session = Session.create(sess_dir, toy_config(spec, steps, be.guidance_scale),
                             info={"task": spec.task, "prompt": prompt})
    ev = SimulatedEvaluator(score_fn, threshold, flip_rate=spec.flip_rate, seed=spec.seed)

    def measure(label: str, n: int) -> dict:
        t = time.time()
        r = evaluate(be, score_fn, threshold, n, steps, spec.eval_seed, prompt)
        r["seconds"] = time.time() - t
        eval_seconds[0] += r["seconds"]
        return r

    # The LoRA starts at zero (B = 0), so every method and seed of a task starts from the same
    # model and the same evaluation draws: measure the base once per process.
    base_key = (spec.task, prompt, score_fn, threshold,
                spec.eval_seed, spec.eval_n, steps, be.guidance_scale, str(device))
    if base_key not in _BASE_EVALS:
        _BASE_EVALS[base_key] = measure("before", spec.eval_n)
    first = _BASE_EVALS[base_key]
    curve = [{"labels": 0, "round": 0, "success": first["success"], "good_rate": None,
              "diversity": first["diversity"], "eval_n": spec.eval_n}]
    log(f"[{spec.task}/{spec.method}/s{spec.seed}] base success {first['success']:.3f} "
        f"on {spec.eval_n} fresh samples")
    if save_grids:
        image_grid(first["images"][:64], 16).save(out_dir / "base_samples.png")

    seen: dict = {}

    def query(batch):
        best = session.best
        marks, scores = ev.query(batch.images, [prompt] * batch.size,
                                 None if best is None else best.score)
        # what the person sees: the true success of the batch this round showed
        seen["session_success"] = (scores >= threshold).float().mean().item()
        score = float(scores[marks.best]) if marks.best is not None else None
        if save_grids:
            image_grid(batch.images, 16, {"good": list(marks.good), "best": marks.best}, 2).save(
                out_dir / f"round_{batch.round:02d}.png")
        return marks, score

    def inspect(plan):
        # how well the representation's soft labels match the truth on the unmarked samples
        if plan.extra is not None:
            imgs = be.decode(plan.extra["x0"].to(be.device)).float().clamp(0, 1).cpu()
            truth = (score_fn(imgs, [prompt] * len(imgs)).float() >= threshold).float()
            pred = (plan.extra["labels"] > 0.5).float()
            plan.metrics.update(extra_label_accuracy=(pred == truth).float().mean().item(),
                                extra_true_good=truth.mean().item())

    last = first
    for round_idx in range(spec.rounds):
        t0 = time.time()
        m = loop.run_round(session, be, query, inspect=inspect)
        curve[-1]["session_success"] = seen["session_success"]
        final = round_idx == spec.rounds - 1
        do_eval = (spec.eval_every and (round_idx + 1) % spec.eval_every == 0) or final
        # "labels" (the marks so far) keeps its old name: stored bench JSON is read back
        point = {"labels": session.marks_used, "round": round_idx + 1,
                 "good_rate": m["good_rate"],
                 "reward_std": m.get("reward_std"), "success": None, "diversity": None,
                 "session_success": None, "bad_above_mean": m.get("bad_above_mean"),
                 "clipfrac": m.get("policy_clipfrac"),
                 "extra_label_accuracy": m.get("extra_label_accuracy"),
                 # the unmarked fresh-noise samples: the share the representation calls good,
                 # and the true share
                 "extra_predicted_good": m.get("extra_predicted_good"),
                 "extra_true_good": m.get("extra_true_good")}
        if do_eval:
            n = spec.eval_n if final else (spec.eval_n_mid or spec.eval_n)
            last = measure(f"round {round_idx}", n)
            point.update(success=last["success"], diversity=last["diversity"], eval_n=n)
        curve.append(point)
        succ = "" if point["success"] is None else f"success {point['success']:.3f}  "
        log(f"[{spec.task}/{spec.method}/s{spec.seed}] round {round_idx + 1}/{spec.rounds}  "
            f"marks {session.marks_used}  good rate {m['good_rate']:.3f}  "
            f"reward spread {m['reward_std']:.4f}  {succ}{time.time() - t0:.1f}s")
    # the batch the person would see next (not marked, not stored): session success at the end
    noises, _ = loop.plan_initial_noise(session, tuple(be.latent_shape))
    nxt = be.sample_fresh(len(noises), steps, 0, x_T=noises)
    curve[-1]["session_success"] = (score_fn(nxt, [prompt] * len(nxt)).float()
                                    >= threshold).float().mean().item()
    if save_grids:
        image_grid(last["images"][:64], 16).save(out_dir / "final_samples.png")
    result = {"task": spec.task, "method": spec.name, "base_method": spec.method,
              "overrides": {k: v for k, v in spec.hero.items()}, "flip_rate": spec.flip_rate,
              "seed": spec.seed, "prompt": prompt,
              "eval_n": spec.eval_n, "batch_size": spec.batch_size, "steps": steps,
              # "cfg": the guidance scale (the key stored bench results have)
              "cfg": be.guidance_scale, "curve": curve, "success_before": first["success"],
              "success_after": last["success"], "marks": session.marks_used,
              "diversity_before": first["diversity"], "diversity_after": last["diversity"],
              "session": str(sess_dir),
              # the session's cost: wall time, and this process's CPU time (what a core spent on
              # it, whatever else ran beside it), of which the fresh-sample evaluations
              "seconds": time.time() - t_start, "cpu_seconds": time.process_time() - cpu_start,
              "eval_seconds": eval_seconds[0]}
    if export:
        from ..lora import export_kohya
        path = out_dir / f"hero_{spec.task}_r{session.round:02d}.safetensors"
        export_kohya(session.load_lora(), path, metadata={
            "hero_session_id": session.session_id, "hero_rounds": str(session.round),
            "hero_marks_used": str(session.marks_used), "hero_prompts": json.dumps([prompt]),
            "hero_task": spec.task})
        result["lora"] = str(path)
    (out_dir / f"result-{tag}.json").write_text(
        json.dumps(result, indent=1))
    return result
