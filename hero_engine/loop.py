"""One HERO round (hero_spec 3.2 / 12) over any backend, split where a host must step in.

    generate_round      feedback-guided noise -> DDIM(eta) chain with log-probs -> images, stored
    (marks)             Session.record_marks (a person through the marks API, or an evaluator)
    prepare_learning    best record, good-noise pool, representation learning, rewards, advantages
    apply_policy_update (extra unmarked samples scored by the representation), then PPO, D3PO or
                        reward-weighted denoising on the LoRA through the backend's denoiser
    complete_round      LoRA + optimizers + encoder + best + pool + metrics, one atomic commit

The ComfyUI adapter calls these pieces from inside its own sampler; the toy demo and the
benchmark call ``run_round``. Randomness comes from generators seeded by (seed, round, phase), so a
round re-run after a crash draws exactly what the interrupted run drew.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .extra_samples import sample_extra, score_extra
from .feedback import Marks
from .guidance import initial_noise, next_noise_pool
from .lora import LoraState, session_tensors
from .denoising import denoise_update, denoising_loss
from .memory import GiB, UpdateOutOfMemory, is_oom, oom_advice, resolve_micro_batch
from .policy import PolicyOptimizer, _autocast, d3po_update, ppo_update
from .representation import RepresentationTrainer
from .reward import (advantages, binary_reward, denoising_weights, mark_anchored_reward,
                     similarity_reward, similarity_to_positives)
from .sampling import DDIMSchedule, Denoiser, Trajectory, sample_with_logprob, trajectory_log_prob
from .session import BestRecord, Session, SessionError

__all__ = ["round_generator", "plan_initial_noise", "generate_round", "LearnPlan",
           "prepare_learning", "add_extra_samples", "policy_batch", "denoising_set", "apply_policy_update",
           "complete_round",
           "run_round"]

Progress = Optional[Callable[[str, int, int], None]]


def round_generator(session: Session, round_idx: int, phase: str, device="cpu") -> torch.Generator:
    """A generator seeded by (config seed, round, phase)."""
    g = torch.Generator(device=device)
    g.manual_seed((session.config.seed * 1_000_003 + round_idx * 7919 + zlib.crc32(phase.encode()))
                  % (2 ** 63))
    return g


def plan_initial_noise(session: Session, shape: tuple[int, ...], batch_size: Optional[int] = None,
                       state: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """x_T for the round in progress: N(0, I) in round 0 (and always for a method without the
    ``guidance`` trait), feedback-guided afterwards (guidance.initial_noise). ``batch_size``:
    this round's size (default the config's); ``state``: the session's learned state if the
    caller has loaded it already."""
    config = session.config
    n = config.batch_size if batch_size is None else int(batch_size)
    gen = round_generator(session, session.round, "noise")
    st = session.load_state() if state is None else state
    guided = config.guidance and "best" in st
    if not guided:
        return initial_noise(n, shape, gen)
    return initial_noise(n, shape, gen, best_noise=st["best"]["noise"],
                         pool=st.get("pool"), beta=config.beta, epsilon=config.epsilon,
                         fresh_ratio=config.fresh_ratio)


@dataclass
class RoundBatch:
    """What a round's generation produced, as ``run_round`` passes it to ``query`` (the ComfyUI
    nodes carry their own ``nodes.host.HeroBatch`` on the HERO_BATCH socket)."""
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
                   extra_meta: Optional[dict] = None, batch_size: Optional[int] = None,
                   state: Optional[dict] = None) -> RoundBatch:
    """Sample the round's batch with the current policy and store it in the session.
    ``batch_size``: this round's size (default the config's; the config is left as it is);
    ``state``: the session's learned state if the caller has loaded it already."""
    config = session.config
    round_idx = session.round
    if session.marks_for(round_idx) is not None:
        raise SessionError(f"round {round_idx} is already marked; train it (HERO_Train) before "
                           f"generating the next batch")
    t0 = time.time()
    size = config.batch_size if batch_size is None else int(batch_size)
    noises, ids = plan_initial_noise(session, tuple(latent_shape), size, state)
    gen = round_generator(session, round_idx, "sample")
    trajs = []
    for s in range(0, size, micro_batch):
        idx = torch.arange(s, min(s + micro_batch, size))
        cb = None if progress is None else (
            lambda i, n, s=s: progress("generate", s * n // max(1, micro_batch) + i,
                                       size * n // max(1, micro_batch)))
        trajs.append(sample_with_logprob(denoiser, noises[idx].to(device), schedule, config.eta,
                                         generator=gen, callback=cb, index=idx.to(device),
                                         store_dtype=torch.float16))  # as the session stores it
    traj = Trajectory(torch.cat([t.latents for t in trajs]), torch.cat([t.log_probs for t in trajs]),
                      schedule, config.eta)
    with torch.no_grad():
        images = decode(traj.x0.float()).float().clamp(0, 1)
    feats = traj.feature_latents(config.feature_latent)
    session.save_generated(round_idx, noises, traj, feats, images,
                           {"prompts": list(prompts), "centre_ids": ids.tolist(),
                            **(extra_meta or {})})
    session.record_timing(generate_seconds=time.time() - t0, generate_images=size)
    return RoundBatch(session, round_idx, images, traj, noises)


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
    marked_features: Optional[Tensor] = None   # every marked image so far (replay), for scoring
    marked_labels: Optional[Tensor] = None     # their marks, 1 good / 0 bad
    extra: Optional[dict] = None               # the unmarked samples of apply_policy_update
    fresh: Optional[Tensor] = None             # [B] bool: the chain started from N(0, I)
    started: float = field(default_factory=time.time)   # when learning began (train_seconds)
    device: Any = "cpu"                        # where the denoiser runs (the chains may not)


def prepare_learning(session: Session, device="cpu", best_score: Optional[float] = None,
                     progress: Progress = None, state: Optional[dict] = None) -> LearnPlan:
    """Steps 3-5 of a round: update the best record, train the representation network on this
    round's triplets (every marked round's with ``encoder_replay``), compute the rewards (the
    method's ``reward`` trait) and advantages. Needs the round's marks on disk. ``state``: the
    session's learned state if the caller has loaded it already."""
    config = session.config
    round_idx = session.round
    marks = session.marks_for(round_idx)
    if marks is None:
        raise SessionError(f"round {round_idx} has no marks yet; mark the batch first")
    gen_data = session.load_generated(round_idx)
    if "latents" not in gen_data:
        raise SessionError(f"round {round_idx}'s trajectory is missing from "
                           f"{session.round_dir(round_idx)}; "
                           f"it cannot be trained")
    st = session.load_state() if state is None else state
    sched = DDIMSchedule(gen_data["timesteps"], gen_data["alpha_bars"])
    # chains_on "cpu" (memory.py): the chains stay in host memory in their stored precision
    # (fp16; exact in fp32, so the PPO ratio is still 1), one micro-batch moving at a time
    lat = gen_data["latents"]
    if config.policy.chains_on != "cpu":
        lat = lat.to(device).float()
    traj = Trajectory(lat, gen_data["log_probs"].to(lat.device), sched, gen_data["eta"])
    n = len(traj)
    feats = gen_data["features"].float()
    marks.validate(n, "best" in st)
    t0 = time.time()

    # 3. best record (a new best leaves the good set used for positives and the noise pool)
    if marks.best is not None:
        best = BestRecord(round_idx, marks.best, best_score)
        best_feature, best_noise = feats[marks.best], gen_data["noises"][marks.best]
    else:
        best = session.best
        best_feature, best_noise = st["best"]["feature"], st["best"]["noise"]
    pool = next_noise_pool(gen_data["noises"], list(marks.good), marks.best)

    # "labels" (this round's marks) and "labels_used" (the marks so far) keep their old names:
    # stored sessions' histories and the front end have them
    metrics = {"round": round_idx, "labels": marks.num_marked,
               "labels_used": session.marks_used + marks.num_marked,
               "good": len(marks.good), "good_rate": len(marks.good) / n,
               "best_changed": marks.best is not None, "method": config.method}
    encoder = None
    y = torch.zeros(n)
    y[list(marks.good)] = 1.0
    all_feats, all_y = feats, y
    if config.uses_encoder:
        # 4. representation learning, continued across rounds; with ``encoder_replay`` the
        # triplets come from every round marked so far (the marks are scarce, the steps cheap)
        encoder = RepresentationTrainer(feats.shape[1], config.representation, seed=config.seed,
                                        device=device)
        if "encoder" in st:
            encoder.load_state_dict(st["encoder"])
        if config.encoder_replay:
            past_f, past_y = session.marked_history(round_idx)
            all_feats, all_y = torch.cat([past_f, feats]), torch.cat([past_y, y])
        off = len(all_feats) - n
        good_all = torch.nonzero(all_y > 0.5).flatten().tolist()
        bad_all = torch.nonzero(all_y <= 0.5).flatten().tolist()
        losses = encoder.train_round(all_feats, best_feature, good_all, bad_all,
                                     None if marks.best is None else off + marks.best,
                                     round_generator(session, round_idx, "encoder"), n_triplets=n)
        metrics.update(triplet_loss_first=losses[0], triplet_loss_last=losses[-1],
                       encoder_marks=len(all_feats))
        # 5. reward on the trunk (the paper) or head features
        h = encoder.features(feats, config.reward_features)
        if config.reward_mode == "similarity-to-best":
            sim = similarity_reward(h, encoder.features(best_feature[None],
                                                        config.reward_features)[0])
        else:
            sim = similarity_to_positives(h, list(marks.good))
        if config.reward == "marks+similarity":
            rewards = mark_anchored_reward(y, sim.cpu(), config.mark_credit)
        else:
            rewards = sim
    else:
        rewards = binary_reward(n, list(marks.good))
    rewards = rewards.cpu()
    adv = advantages(rewards, config.policy.adv_clip)
    good_r = rewards[list(marks.good)].mean().item()
    bad_r = rewards[list(marks.bad)].mean().item()
    metrics.update(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
                   reward_min=rewards.min().item(), reward_max=rewards.max().item(),
                   reward_good_minus_bad=good_r - bad_r, encoder_seconds=time.time() - t0,
                   bad_above_mean=(adv[list(marks.bad)] > 0).float().mean().item())
    return LearnPlan(round_idx, marks, traj, rewards, adv, best, best_feature, best_noise, pool,
                     encoder, metrics, marked_features=all_feats, marked_labels=all_y,
                     fresh=_fresh_chains(session, round_idx, n), device=torch.device(device))


def add_extra_samples(session: Session, plan: LearnPlan, denoiser: Denoiser,
                      progress: Progress = None) -> tuple[Trajectory, Tensor]:
    """``extra_ratio`` x batch unmarked chains from N(0, I) under the policy that made the batch,
    scored by the representation (extra_samples.py) -> (their chains, their rewards)."""
    config = session.config
    traj = plan.trajectory
    dev = plan.device
    cb = None if progress is None else (lambda i, n: progress("extra samples", i, n))
    t0 = time.time()
    m = config.extra_samples(len(traj))
    extra = sample_extra(denoiser, m, tuple(traj.latents.shape[2:]),
                         traj.schedule, traj.eta, round_generator(session, plan.round, "extra"),
                         dev, micro_batch=max(1, len(traj)), index_cycle=len(traj), callback=cb)
    feats = extra.feature_latents(config.feature_latent).float()
    r_extra, p = score_extra(plan.encoder, feats, plan.marked_features, plan.marked_labels,
                             plan.best_feature, config.extra_neighbours, config.mark_credit,
                             config.reward_features)
    plan.extra = {"x0": extra.x0.float().cpu(), "labels": p, "rewards": r_extra}
    plan.metrics.update(extra_samples=m,
                        extra_predicted_good=float((p > 0.5).float().mean()),
                        extra_seconds=time.time() - t0)
    return extra, r_extra


def policy_batch(session: Session, plan: LearnPlan, denoiser: Denoiser,
                 progress: Progress = None) -> tuple[Trajectory, Tensor]:
    """The chains the policy update trains on and their advantages, whitened over them: the
    marked batch (without its guided chains when the method's ``guided_policy`` is off) and the
    extra samples (``extra_ratio``)."""
    config = session.config
    traj, rewards = plan.trajectory, plan.rewards
    n = len(traj)
    keep = torch.arange(n)
    if not config.guided_policy and plan.fresh is not None:
        keep = torch.nonzero(plan.fresh).flatten()
    want_extra = config.extra_samples(n) > 0 and plan.encoder is not None
    if len(keep) == 0 and not want_extra:
        keep = torch.arange(n)       # nothing fresh to train on: the batch as it is
    if len(keep) == n and not want_extra:
        return traj, plan.advantages
    dev = traj.latents.device
    # fp32 when extra chains join: they were scored on their fp32 chain (PPO ratio exactly 1)
    dtype = torch.float32 if want_extra else traj.latents.dtype
    parts_l, parts_p, parts_r = [traj.latents[keep.to(dev)].to(dtype)], \
        [traj.log_probs[keep.to(traj.log_probs.device)]], [rewards[keep]]
    if want_extra:
        extra, r_extra = add_extra_samples(session, plan, denoiser, progress)
        parts_l.append(extra.latents.to(dev, dtype))
        parts_p.append(extra.log_probs.to(traj.log_probs.device))
        parts_r.append(r_extra)
    plan.metrics["policy_chains"] = sum(len(x) for x in parts_r)
    both = Trajectory(torch.cat(parts_l), torch.cat(parts_p), traj.schedule, traj.eta)
    return both, advantages(torch.cat(parts_r), config.policy.adv_clip)


def denoising_set(session: Session, plan: LearnPlan) -> tuple[Tensor, Tensor]:
    """The images reward-weighted denoising imitates and their weights (reward.denoising_weights):
    every image marked so far, with the rewards of the method's ``reward`` trait recomputed under
    the current representation (so earlier rounds' good images are graded as it learns), and the
    ``extra_ratio`` unmarked samples with the representation's soft labels."""
    config = session.config
    traj = plan.trajectory
    dev = plan.device
    past_x0, past_y = session.marked_history(plan.round, what="x0")
    y_now = torch.zeros(len(traj))
    y_now[list(plan.marks.good)] = 1.0
    x0 = traj.x0.float().cpu()
    if len(past_y):
        x0, ys = torch.cat([past_x0.float(), x0]), torch.cat([past_y, y_now])
    else:
        ys = y_now
    if plan.encoder is not None and config.reward == "marks+similarity":
        past_f, _ = session.marked_history(plan.round)
        feats = traj.feature_latents(config.feature_latent).float().cpu()
        if len(past_f) == len(past_y) and len(past_y):
            feats = torch.cat([past_f, feats])
        if len(feats) == len(ys):
            h = plan.encoder.features(feats, config.reward_features)
            hb = plan.encoder.features(plan.best_feature[None], config.reward_features)[0]
            r = mark_anchored_reward(ys, similarity_reward(h, hb).cpu(), config.mark_credit)
        else:
            r = ys.clone()
    else:
        r = ys.clone()
    w = denoising_weights(ys, r)
    if plan.extra is not None:
        x0 = torch.cat([x0, plan.extra["x0"]])
        w = torch.cat([w, denoising_weights(plan.extra["labels"], plan.extra["rewards"])])
    return x0.to(dev), w


def _fresh_chains(session: Session, round_idx: int, n: int) -> Optional[Tensor]:
    ids = session.round_meta(round_idx).get("centre_ids")
    return None if ids is None or len(ids) != n else torch.tensor(ids) == -1


def apply_policy_update(session: Session, plan: LearnPlan, denoiser: Denoiser,
                        popt: PolicyOptimizer, progress: Progress = None,
                        conditional: Optional[Denoiser] = None) -> dict:
    """Step 6 through the backend's denoiser, by the method's ``update`` trait: PPO over
    ``policy_batch`` (the marked batch and, with the ``extra_ratio`` trait, the unmarked samples
    the representation scores), D3PO over good-bad pairs, or reward-weighted denoising over
    ``denoising_set``, which trains the ``conditional`` prediction eps(x, t, c) (no guidance;
    default ``denoiser``) as LoRA fine-tuning does. The micro-batch follows the memory settings
    (memory.py); out of memory, the LoRA is kept and ``UpdateOutOfMemory`` names the fix."""
    config = session.config
    pcfg = popt.config
    probe_box: dict = {}
    try:
        m = _policy_update(session, plan, denoiser, popt, progress, conditional, probe_box)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
        mb = probe_box.get("micro_batch", pcfg.train_batch_size)
        chain = plan.trajectory.latents.numel() * 4 if pcfg.chains_on != "cpu" else 0
        raise UpdateOutOfMemory(
            f"out of {plan.device.type.upper()} memory in the LoRA update of round {plan.round} "
            f"(micro-batch {mb}, method {config.method}); the LoRA and the marks are kept. Set "
            f"(in ComfyUI: the HERO Session widget of the same name, which applies to an "
            f"existing session too; in the engine: the session config's policy settings, "
            f"hero_engine/memory.py): "
            f"{oom_advice(pcfg, mb, chain, probe_box.get('probe'))}; then train the round "
            f"again.") from None
    finally:
        popt.config = pcfg
    plan.metrics.update(m)
    return m


def _probe_pass(denoiser: Denoiser, plan: LearnPlan, pcfg, kind: str, x0: Optional[Tensor]
                ) -> Callable[[int], None]:
    """A forward + backward of ``b`` images as the update makes them (for memory.probe_cuda)."""
    traj, dev = plan.trajectory, plan.device

    def run(b: int) -> None:
        b = min(b, len(traj) if x0 is None else len(x0))
        idx = torch.arange(b)
        with _autocast(pcfg, dev):
            if kind == "rwr":
                step = torch.zeros(b, dtype=torch.long)
                noise = torch.zeros((b, *x0.shape[1:]), device=dev)
                out = denoising_loss(denoiser, x0[:b].to(dev), torch.ones(b), traj.schedule,
                                     step, noise, torch.zeros(b, dtype=torch.long, device=dev))
            else:
                out = trajectory_log_prob(denoiser, traj, idx, torch.zeros(b, dtype=torch.long),
                                          dev).sum()
        out.float().backward()
    return run


def _policy_update(session: Session, plan: LearnPlan, denoiser: Denoiser, popt: PolicyOptimizer,
                   progress: Progress, conditional: Optional[Denoiser], probe_box: dict) -> dict:
    config = session.config
    gen = round_generator(session, plan.round, "policy")
    cb = None if progress is None else (lambda i, n: progress("train", i, n))
    t0 = time.time()
    mem: dict = {}

    def size_micro_batch(kind: str, den: Denoiser, x0: Optional[Tensor] = None) -> None:
        pcfg = popt.config
        run = _probe_pass(den, plan, pcfg, kind, x0) if pcfg.micro_batch == 0 else None
        popt.config, probe = resolve_micro_batch(pcfg, plan.device, run)
        popt.opt.zero_grad(set_to_none=True)     # the probe's gradients are not a step
        probe_box.update(micro_batch=popt.config.train_batch_size, probe=probe)
        mem["train_micro_batch"] = popt.config.train_batch_size
        if probe is not None:
            mem.update(probe_per_image_gib=probe.per_image / GiB, probe_free_gib=probe.free / GiB)

    if config.update == "d3po":
        size_micro_batch("ppo", denoiser)
        m = d3po_update(denoiser, plan.trajectory, list(plan.marks.good), list(plan.marks.bad),
                        popt, gen, cb, device=plan.device)
    elif config.update == "rwr":
        if config.extra_samples(len(plan.trajectory)) > 0 and plan.encoder is not None:
            add_extra_samples(session, plan, denoiser, progress)
        x0, w = denoising_set(session, plan)
        den = conditional or denoiser
        n_step = popt.config.train_batch_size * popt.config.grad_accum
        size_micro_batch("rwr", den, x0)
        m = denoise_update(den, x0, w, plan.trajectory.schedule, popt, gen,
                           popt.config.denoise_steps, n_step, callback=cb)
        m.update(denoise_images=int((w > 0).sum()), denoise_pool=len(w))
    else:
        traj, adv = policy_batch(session, plan, denoiser, progress)
        size_micro_batch("ppo", denoiser)
        pcfg = popt.config
        # as many AdamW steps as the marked batch alone would take, each over more (or fewer)
        # samples: extra samples sharpen the gradient, they do not lengthen the step
        grow = len(traj) / len(plan.trajectory)
        if grow != 1:
            popt.config = dataclasses.replace(
                pcfg, grad_accum=max(1, round(pcfg.grad_accum * grow)))
        m = ppo_update(denoiser, traj, adv, popt, gen, cb, device=plan.device)
    m = {f"policy_{k}": v for k, v in m.items()}
    m["policy_seconds"] = time.time() - t0
    m.update(mem)
    return m


def complete_round(session: Session, plan: LearnPlan, lora: "LoraState | dict",
                   popt: PolicyOptimizer, extra_metrics: Optional[dict] = None) -> dict:
    """Step 7-8: commit LoRA (a LoraState or its ``to_tensors()`` form), optimizers, encoder,
    best record and noise pool atomically."""
    state = {"lora": session_tensors(lora),
             "policy_opt": popt.state_dict(),
             "best": {"feature": plan.best_feature.cpu(), "noise": plan.best_noise.cpu()},
             "pool": plan.pool.cpu()}
    if plan.encoder is not None:
        state["encoder"] = plan.encoder.state_dict()
    metrics = {**plan.metrics, **(extra_metrics or {}), "time": time.time(),
               "train_seconds": time.time() - plan.started}
    session.complete_round(plan.round, state, metrics, plan.best, plan.marks.num_marked)
    session.record_timing(train_seconds=metrics["train_seconds"])
    return metrics


def run_round(session: Session, backend, query: Callable[[RoundBatch], tuple[Marks, Optional[float]]],
              progress: Progress = None, inspect: Optional[Callable[[LearnPlan], None]] = None
              ) -> dict:
    """A whole round on a standalone backend (toy, diffusers): generate, ask ``query`` for marks
    (returns the marks and the new best's score, if known), learn, commit. ``inspect(plan)`` sees
    the round's plan after the update (the benchmark checks the extra samples' labels)."""
    t0 = time.time()
    # an update that recomputes no log-probs ("rwr" trains on the images) may sample with the
    # LoRA merged into the weights (faster); PPO and D3PO must sample as they recompute
    merged = getattr(backend, "merged_lora", None)
    with (merged() if merged and session.config.update == "rwr" else contextlib.nullcontext()):
        batch = generate_round(session, backend.denoiser(), backend.decode,
                               backend.schedule(session.config.steps), backend.latent_shape,
                               backend.prompts, device=backend.device, progress=progress)
    marks, best_score = query(batch)
    session.record_marks(batch.round, marks)
    t1 = time.time()
    plan = prepare_learning(session, backend.device, best_score=best_score, progress=progress)
    popt = backend.policy_optimizer(session)
    modes = getattr(backend, "training", None)
    with (modes(session.config.policy) if modes else contextlib.nullcontext()):
        apply_policy_update(session, plan, backend.denoiser(), popt, progress,
                            conditional=backend.denoiser(guidance_scale=1.0))
    if inspect is not None:
        inspect(plan)
    return complete_round(session, plan, backend.lora_tensors(), popt,
                          {"generate_seconds": t1 - t0, "round_seconds": time.time() - t0})
