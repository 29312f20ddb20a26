"""The update's memory modes (memory.py): a micro-batch that regroups the same AdamW steps,
chains kept on the CPU in fp16 with the PPO ratio still 1, gradient checkpointing that learns the
same LoRA, and an out-of-memory error that keeps the LoRA and names the fix."""
import dataclasses

import pytest
import torch

from hero_engine import loop
from hero_engine.memory import (GiB, MEMORY_SETTINGS, MemoryProbe, UpdateOutOfMemory,
                                choose_micro_batch, oom_advice, resolve_micro_batch,
                                with_memory_settings)
from hero_engine.policy import PolicyConfig
from hero_engine.sampling import trajectory_log_prob
from hero_engine.session import HeroConfig, Session

from tiny import evaluator, query_fn, tiny_backend, tiny_config


def test_micro_batch_is_the_largest_divisor_that_fits():
    # 8 images a step; 1 GiB fixed + 0.5 GiB an image within 0.85 x 4 GiB: 4 fit, 5 would not
    p = MemoryProbe(fixed=1 * GiB, per_image=0.5 * GiB, free=4 * GiB)
    assert choose_micro_batch(8, p, fallback=2) == 4
    assert choose_micro_batch(8, MemoryProbe(0, 0.1 * GiB, 80 * GiB), 2) == 8   # capped at a step
    assert choose_micro_batch(8, MemoryProbe(5 * GiB, GiB, 4 * GiB), 2) == 1    # nothing fits: 1
    assert choose_micro_batch(6, None, fallback=4) == 3    # a divisor of the step, not above 4
    c = PolicyConfig(train_batch_size=2, grad_accum=4, micro_batch=1)
    r, probe = resolve_micro_batch(c, "cpu")
    assert (r.train_batch_size, r.grad_accum, probe) == (1, 8, None)   # same 8 images a step
    # auto on a CPU (no free-memory figure): the configured micro-batch, unchanged
    auto, probe = resolve_micro_batch(PolicyConfig(), "cpu", run=lambda b: 1 / 0)
    assert auto == PolicyConfig() and probe is None


def test_memory_settings_are_checked():
    for bad, msg in (({"chains_on": "disk"}, "chains_on"), ({"mixed_precision": "fp8"}, "precision"),
                     ({"micro_batch": -1}, "micro_batch")):
        with pytest.raises(ValueError, match=msg):
            HeroConfig(policy=PolicyConfig(**bad)).validate()
    # sessions written before the memory settings open with the defaults
    old = HeroConfig().to_json()
    for k in ("micro_batch", "gradient_checkpointing", "chains_on", "release_models"):
        old["policy"].pop(k)
    opened = HeroConfig.from_json(old)
    assert opened.policy.chains_on == "cpu" and opened.policy.release_models is True


def test_memory_settings_replace_only_themselves():
    c = HeroConfig(method="hero-paper", lora_rank=8, policy=PolicyConfig(lr=3e-4))
    m = with_memory_settings(c, micro_batch=1, gradient_checkpointing=True, chains_on=None)
    assert (m.policy.micro_batch, m.policy.gradient_checkpointing, m.policy.chains_on) == \
        (1, True, "cpu")                                      # None keeps a setting
    assert c.policy.micro_batch == 0, "the original config is not changed"
    same = {k: v for k, v in m.to_json().items() if k != "policy"}
    assert same == {k: v for k, v in c.to_json().items() if k != "policy"}
    changed = {k for k, v in m.policy.__dict__.items() if v != getattr(c.policy, k)}
    assert changed == {"micro_batch", "gradient_checkpointing"} <= set(MEMORY_SETTINGS)
    assert with_memory_settings(c) is c
    with pytest.raises(ValueError, match="not a memory setting: lr"):
        with_memory_settings(c, lr=1.0)
    with pytest.raises(ValueError, match="chains_on"):
        with_memory_settings(c, chains_on="disk")


def _round(tmp_path, name, method="ddpo-binary", **policy):
    """One generated and marked round, ready to train -> (session, backend)."""
    torch.set_num_threads(1)
    be = tiny_backend()
    pol = dict(lr=1e-3, timesteps_per_sample=2, grad_accum=2, denoise_steps=10)
    pol.update(policy)
    s = Session.create(tmp_path / name, tiny_config(method=method, policy=PolicyConfig(**pol)))
    batch = loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                                be.latent_shape, be.prompts)
    marks, _ = query_fn(be, evaluator(), s)(batch)
    s.record_marks(0, marks)
    return s, be


def _train(s, be):
    plan = loop.prepare_learning(s)
    popt = be.policy_optimizer(s)
    with be.training(s.config.policy):
        m = loop.apply_policy_update(s, plan, be.denoiser(), popt, conditional=be.denoiser(guidance_scale=1.0))
    return plan, m, be.lora_tensors()


@pytest.mark.parametrize("method", ["ddpo-binary", "hero"])
def test_memory_modes_learn_the_same_lora(tmp_path, method):
    """Micro-batch 1 instead of 2, chains on the CPU or the device, checkpointing on or off:
    the same LoRA (up to float summation order)."""
    s, be = _round(tmp_path, "ref", method, train_batch_size=2, chains_on="device")
    init = be.lora_tensors()
    plan, m, ref = _train(s, be)
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 1e-4
    assert plan.trajectory.latents.dtype == torch.float32 and m["train_micro_batch"] == 2
    for i, kw in enumerate(({"micro_batch": 1, "chains_on": "cpu"},
                            {"gradient_checkpointing": True, "chains_on": "cpu"})):
        s2, be2 = _round(tmp_path, f"m{i}", method, train_batch_size=2, **kw)
        plan2, m2, lora = _train(s2, be2)
        assert plan2.trajectory.latents.dtype == torch.float16     # kept as stored
        assert m2["train_micro_batch"] == kw.get("micro_batch", 2)
        assert m2["policy_optimizer_steps"] == m["policy_optimizer_steps"]
        diff = max((lora[k] - ref[k]).abs().max().item() for k in ref)
        if "micro_batch" in kw:   # other summation order, amplified by Adam: measured 1.5% (ppo)
            assert diff <= 0.05 * moved, (diff, moved)
        else:                     # the same arithmetic: bit for bit
            assert diff == 0.0, diff
        assert not any(getattr(mod, "gradient_checkpointing", False)
                       for mod in be2.unet.modules())     # switched off after the update


def test_ppo_ratio_is_one_with_the_chains_on_the_cpu(tmp_path):
    s, be = _round(tmp_path, "r", chains_on="cpu")
    plan = loop.prepare_learning(s, device="cpu")
    traj = plan.trajectory
    n, T = traj.log_probs.shape
    with torch.no_grad():
        for t in range(T):
            lp = trajectory_log_prob(be.denoiser(), traj, torch.arange(n), torch.full((n,), t),
                                     device="cpu")
            assert (torch.exp(lp - traj.log_probs[:, t]) - 1).abs().max().item() < 1e-6


def test_out_of_memory_keeps_the_lora_and_names_the_fix(tmp_path):
    s, be = _round(tmp_path, "oom", chains_on="device", train_batch_size=2)
    plan = loop.prepare_learning(s)
    popt = be.policy_optimizer(s)
    before = be.lora_tensors()
    den, calls = be.denoiser(), [0]

    def failing(x, t, ab, idx):
        calls[0] += 1
        if calls[0] > 5:    # after an optimizer step has already changed the LoRA
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return den(x, t, ab, idx)

    with pytest.raises(UpdateOutOfMemory) as e:
        loop.apply_policy_update(s, plan, failing, popt)
    msg = str(e.value)
    assert "policy.micro_batch 1 (now 2)" in msg and "policy.gradient_checkpointing true" in msg
    assert 'policy.chains_on "cpu" (saves' in msg and "marks are kept" in msg
    after = be.lora_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert popt.config.train_batch_size == 2    # the session's settings are left as they were
    # with a probe, each setting says how much it saves
    tip = oom_advice(dataclasses.replace(PolicyConfig(), mixed_precision="no"), 4, 0,
                     MemoryProbe(GiB, GiB, 4 * GiB))
    assert "policy.micro_batch 2 (now 4) (saves about 2.0 GiB)" in tip
    assert "policy.gradient_checkpointing true (saves about 2.7 GiB)" in tip
    assert 'policy.mixed_precision "fp16" or "bf16"' in tip
