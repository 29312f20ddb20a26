"""One HERO round (hero_spec 3.2 / 12) over any backend, split where a host must step in.

    generate_round      feedback-guided noise -> DDIM(eta) chain with log-probs -> images, stored
    (marks)             Session.record_marks (a person through the marks API, or an evaluator)
    prepare_learning    best record, good-noise pool, representation learning, rewards, advantages
    apply_policy_update PPO (or D3PO) on the LoRA through the backend's denoiser
    complete_round      LoRA + optimizers + encoder + best + pool + metrics, one atomic commit

The ComfyUI adapter calls these pieces from inside its own sampler; the toy demo and the
benchmark call ``run_round``. Randomness comes from generators seeded by (seed, round, phase), so a
round re-run after a crash draws exactly what the interrupted run drew.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .feedback import Marks
from .guidance import initial_noise, next_noise_pool
from .policy import PolicyOptimizer, d3po_update, ppo_update
from .representation import RepresentationTrainer
from .reward import advantages, binary_reward, similarity_reward, similarity_to_positives
from .sampling import DDIMSchedule, Denoiser, Trajectory, sample_with_logprob
from .session import BestRecord, Session, SessionError

__all__ = ["round_generator", "plan_initial_noise", "generate_round", "LearnPlan",
           "prepare_learning", "apply_policy_update", "complete_round", "run_round"]

Progress = Optional[Callable[[str, int, int], None]]


def round_generator(session: Session, k: int, phase: str, device="cpu") -> torch.Generator:
    """A generator seeded by (config seed, round, phase)."""
    g = torch.Generator(device=device)
    g.manual_seed((session.config.seed * 1_000_003 + k * 7919 + zlib.crc32(phase.encode()))
                  % (2 ** 63))
    return g


def plan_initial_noise(session: Session, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """x_T for the round in progress: N(0, I) in round 0 (and always for ``hero-no-guidance``,
    ``ddpo-binary`` and ``d3po``), feedback-guided afterwards (guidance.initial_noise)."""
    cfg = session.config
    gen = round_generator(session, session.round, "noise")
    st = session.load_state()
    guided = cfg.method == "hero" and "best" in st
    if not guided:
        return initial_noise(cfg.batch_size, shape, gen)
    return initial_noise(cfg.batch_size, shape, gen, best_noise=st["best"]["noise"],
                         pool=st.get("pool"), beta=cfg.beta, epsilon=cfg.epsilon,
                         fresh_ratio=cfg.fresh_ratio)


@dataclass
class RoundBatch:
    """What a round's generation produced (the HERO_BATCH the nodes pass around)."""
    session: Session
    round: int
    images: Tensor          # [B, 3, H, W] in [0, 1]
    trajectory: Trajectory
    noises: Tensor

    @property
    def size(self) -> int:
        return self.images.shape[0]


def generate_round(session: Session, denoiser: Denoiser, decode: Callable[[Tensor], Tensor],
                   schedule: DDIMSchedule, latent_shape: tuple[int, ...], prompts: list[str],
                   device="cpu", progress: Progress = None, micro_batch: int = 64,
                   extra_meta: Optional[dict] = None) -> RoundBatch:
    """Sample the round's batch with the current policy and store it in the session."""
    cfg = session.config
    k = session.round
    if session.marks_for(k) is not None:
        raise SessionError(f"round {k} is already marked; train it (HERO_Train) before "
                           f"generating the next batch")
    noises, ids = plan_initial_noise(session, tuple(latent_shape))
    gen = round_generator(session, k, "sample")
    trajs = []
    for s in range(0, cfg.batch_size, micro_batch):
        idx = torch.arange(s, min(s + micro_batch, cfg.batch_size))
        cb = None if progress is None else (
            lambda i, n, s=s: progress("generate", s * n // max(1, micro_batch) + i,
                                       cfg.batch_size * n // max(1, micro_batch)))
        trajs.append(sample_with_logprob(denoiser, noises[idx].to(device), schedule, cfg.eta,
                                         generator=gen, callback=cb, index=idx.to(device)))
    traj = Trajectory(torch.cat([t.latents for t in trajs]), torch.cat([t.log_probs for t in trajs]),
                      schedule, cfg.eta)
    with torch.no_grad():
        images = decode(traj.x0).float().clamp(0, 1)
    feats = traj.feature_latents(cfg.feature_latent)
    session.save_generated(k, noises, traj, feats, images,
                           {"prompts": list(prompts), "centre_ids": ids.tolist(),
                            **(extra_meta or {})})
    return RoundBatch(session, k, images, traj, noises)


@dataclass
class LearnPlan:
    round: int
    marks: Marks
    trajectory: Trajectory
    rewards: Tensor
    advantages: Tensor
    best: Optional[BestRecord]
    best_feature: Tensor
    best_noise: Tensor
    pool: Tensor
    encoder: Optional[RepresentationTrainer]
    metrics: dict = field(default_factory=dict)


def prepare_learning(session: Session, device="cpu", best_score: Optional[float] = None,
                     progress: Progress = None) -> LearnPlan:
    """Steps 3-5 of a round: update the best record, train the representation network on this
    round's triplets, compute rewards and advantages. Needs the round's marks on disk."""
    cfg = session.config
    k = session.round
    marks = session.marks_for(k)
    if marks is None:
        raise SessionError(f"round {k} has no marks yet; mark the batch first")
    gen_data = session.load_generated(k)
    if "latents" not in gen_data:
        raise SessionError(f"round {k}'s trajectory is missing from {session.round_dir(k)}; "
                           f"it cannot be trained")
    st = session.load_state()
    sched = DDIMSchedule(gen_data["timesteps"], gen_data["alpha_bars"])
    traj = Trajectory(gen_data["latents"].to(device).float(), gen_data["log_probs"].to(device),
                      sched, gen_data["eta"])
    n = len(traj)
    feats = gen_data["features"].float()
    marks.validate(n, "best" in st)
    t0 = time.time()

    # 3. best record (a new best leaves the good set used for positives and the noise pool)
    if marks.best is not None:
        best = BestRecord(k, marks.best, best_score)
        best_feature, best_noise = feats[marks.best], gen_data["noises"][marks.best]
    else:
        best = session.best
        best_feature, best_noise = st["best"]["feature"], st["best"]["noise"]
    pool = next_noise_pool(gen_data["noises"], list(marks.good), marks.best)

    metrics = {"round": k, "labels": marks.count, "labels_used": session.labels_used + marks.count,
               "good": len(marks.good), "good_rate": len(marks.good) / n,
               "best_changed": marks.best is not None, "method": cfg.method}
    encoder = None
    if cfg.method == "hero" or cfg.method == "hero-no-guidance":
        # 4. representation learning, continued across rounds
        encoder = RepresentationTrainer(feats.shape[1], cfg.representation, seed=cfg.seed,
                                        device=device)
        if "encoder" in st:
            encoder.load_state_dict(st["encoder"])
        losses = encoder.train_round(feats, best_feature, list(marks.good), list(marks.bad),
                                     marks.best, round_generator(session, k, "encoder"))
        metrics.update(triplet_loss_first=losses[0], triplet_loss_last=losses[-1])
        # 5. reward on the trunk features
        h = encoder.features(feats, cfg.reward_features)
        if cfg.reward_mode == "similarity-to-best":
            rewards = similarity_reward(h, encoder.features(best_feature[None],
                                                            cfg.reward_features)[0])
        else:
            rewards = similarity_to_positives(h, list(marks.good))
    else:
        rewards = binary_reward(n, list(marks.good))
    rewards = rewards.cpu()
    adv = advantages(rewards, cfg.policy.adv_clip)
    good_r = rewards[list(marks.good)].mean().item()
    bad_r = rewards[list(marks.bad)].mean().item()
    metrics.update(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
                   reward_min=rewards.min().item(), reward_max=rewards.max().item(),
                   reward_good_minus_bad=good_r - bad_r, encoder_seconds=time.time() - t0)
    return LearnPlan(k, marks, traj, rewards, adv, best, best_feature, best_noise, pool, encoder,
                     metrics)


def apply_policy_update(session: Session, plan: LearnPlan, denoiser: Denoiser,
                        popt: PolicyOptimizer, progress: Progress = None) -> dict:
    """Step 6: one PPO epoch (or D3PO for the baseline) through the backend's denoiser."""
    cfg = session.config
    gen = round_generator(session, plan.round, "policy")
    cb = None if progress is None else (lambda i, n: progress("train", i, n))
    t0 = time.time()
    if cfg.method == "d3po":
        m = d3po_update(denoiser, plan.trajectory, list(plan.marks.good), list(plan.marks.bad),
                        popt, gen, cb)
    else:
        m = ppo_update(denoiser, plan.trajectory, plan.advantages, popt, gen, cb)
    m = {f"policy_{k}": v for k, v in m.items()}
    m["policy_seconds"] = time.time() - t0
    plan.metrics.update(m)
    return m


def complete_round(session: Session, plan: LearnPlan, lora_state: dict, popt: PolicyOptimizer,
                   extra_metrics: Optional[dict] = None) -> dict:
    """Step 7-8: commit LoRA, optimizers, encoder, best record and noise pool atomically."""
    state = {"lora": {k: v.detach().cpu().float().clone() for k, v in lora_state.items()},
             "policy_opt": popt.state_dict(),
             "best": {"feature": plan.best_feature.cpu(), "noise": plan.best_noise.cpu()},
             "pool": plan.pool.cpu()}
    if plan.encoder is not None:
        state["encoder"] = plan.encoder.state_dict()
    metrics = {**plan.metrics, **(extra_metrics or {}), "time": time.time()}
    session.complete_round(plan.round, state, metrics, plan.best, plan.marks.count)
    return metrics


def run_round(session: Session, backend, query: Callable[[RoundBatch], tuple[Marks, Optional[float]]],
              progress: Progress = None) -> dict:
    """A whole round on a standalone backend (toy, diffusers): generate, ask ``query`` for marks
    (returns the marks and the new best's score, if known), learn, commit."""
    t0 = time.time()
    batch = generate_round(session, backend.denoiser(), backend.decode,
                           backend.schedule(session.config.steps), backend.latent_shape,
                           backend.prompts, device=backend.device, progress=progress)
    marks, best_score = query(batch)
    session.record_marks(batch.round, marks)
    t1 = time.time()
    plan = prepare_learning(session, backend.device, best_score=best_score, progress=progress)
    popt = backend.policy_optimizer(session)
    apply_policy_update(session, plan, backend.denoiser(), popt, progress)
    return complete_round(session, plan, backend.lora_state(), popt,
                          {"generate_seconds": t1 - t0, "round_seconds": time.time() - t0})
