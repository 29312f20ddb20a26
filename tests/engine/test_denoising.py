"""Reward-weighted denoising (hero's update): the loss, the weights, the replay set, rejection,
the conditional denoiser, and sessions from before the LoRA layer setting."""
import json

import pytest
import torch

from hero_engine import loop
from hero_engine.backends import cfg_denoiser
from hero_engine.denoising import denoise_update, denoising_loss
from hero_engine.policy import PolicyConfig, PolicyOptimizer, UpdateRejected
from hero_engine.reward import denoising_weights
from hero_engine.session import LORA_TARGETS, HeroConfig, Session

from tiny import evaluator, query_fn, tiny_backend, tiny_config


def _fixed_loss(be, x0, schedule, seed=0):
    """The denoising loss of ``x0`` on fixed noise and every step of the schedule."""
    g = torch.Generator().manual_seed(seed)
    n, T = len(x0), len(schedule.timesteps)
    x = x0.repeat(T, 1, 1, 1)
    steps = torch.arange(T).repeat_interleave(n)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return denoising_loss(be.denoiser(guidance_scale=1.0), x, torch.ones(len(x)), schedule, steps, noise,
                              torch.zeros(len(x), dtype=torch.long)).item()


def test_denoising_weights_never_imitate_a_bad_image():
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.7, 0.2])
    r = torch.tensor([1.2, 0.24, 1.0, 0.0, 0.9, 0.3])
    w = denoising_weights(y, r)
    assert w.tolist() == pytest.approx([1.2, 0.0, 1.0, 0.0, 0.9, 0.0])


def test_update_lowers_the_loss_of_the_good_images_and_skips_zero_weights():
    torch.set_num_threads(1)
    be = tiny_backend()
    sched = be.schedule(4)
    g = torch.Generator().manual_seed(1)
    good = torch.randn((3, 4, 8, 8), generator=g) * 0.5
    # a zero-weight image that would poison the loss if it were ever used
    x0 = torch.cat([good, torch.full((1, 4, 8, 8), float("nan"))])
    w = torch.tensor([1.0, 1.0, 1.25, 0.0])
    before = _fixed_loss(be, good, sched)
    popt = PolicyOptimizer(be.lora_parameters(), PolicyConfig(lr=3e-3, train_batch_size=2))
    m = denoise_update(be.denoiser(guidance_scale=1.0), x0, w, sched, popt, torch.Generator().manual_seed(0),
                       steps=30, samples_per_step=4)
    after = _fixed_loss(be, good, sched)
    assert m["optimizer_steps"] == 30 and m["backward_passes"] == 60
    assert after < before * 0.95, (before, after)


def test_a_non_finite_update_is_rejected_and_the_lora_kept():
    be = tiny_backend()
    sched = be.schedule(4)
    popt = PolicyOptimizer(be.lora_parameters(), PolicyConfig(lr=1e-3, train_batch_size=2))
    before = be.lora_tensors()
    x0 = torch.full((2, 4, 8, 8), float("nan"))
    with pytest.raises(UpdateRejected, match="previous LoRA kept"):
        denoise_update(be.denoiser(guidance_scale=1.0), x0, torch.ones(2), sched, popt,
                       torch.Generator().manual_seed(0), steps=2, samples_per_step=2)
    after = be.lora_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="positive weight"):
        denoise_update(be.denoiser(guidance_scale=1.0), torch.zeros((2, 4, 8, 8)), torch.zeros(2), sched,
                       popt, torch.Generator().manual_seed(0), steps=2, samples_per_step=2)


def test_cfg_one_is_the_conditional_prediction_alone():
    be = tiny_backend()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 20])
    ab = be.alphas_cumprod[t]
    idx = torch.zeros(2, dtype=torch.long)
    cond_only = be.denoiser(guidance_scale=1.0)(x, t, ab, idx)
    with torch.no_grad():
        direct = be.unet(x, t, encoder_hidden_states=be._cond.expand(2, -1, -1)).sample
    assert torch.allclose(cond_only, direct, atol=1e-5)
    # the guided prediction at another scale is not the conditional one
    assert not torch.allclose(be.denoiser()(x, t, ab, idx), direct, atol=1e-3)
    # the general formula at cfg 1 agrees (the shortcut changes the cost, not the value)
    general = cfg_denoiser(be.unet, be._cond, be._uncond, 1.0 + 1e-12)(x, t, ab, idx)
    assert torch.allclose(cond_only, general, atol=1e-4)


@pytest.mark.parametrize("method", ["rwr-binary", "hero"])
def test_every_marked_good_image_so_far_is_imitated(tmp_path, method):
    torch.set_num_threads(1)
    be = tiny_backend()
    config = tiny_config(method=method, feature_latent="t1",
                         policy=PolicyConfig(lr=1e-3, train_batch_size=2, grad_accum=2,
                                             denoise_steps=3))
    s = Session.create(tmp_path / method, config)
    ev = evaluator()
    goods = 0
    for k in range(2):
        m = loop.run_round(s, be, query_fn(be, ev, s))
        goods += m["good"]
        assert m["policy_denoise_pool"] == (k + 1) * config.batch_size
        assert m["policy_denoise_images"] == goods
        assert m["policy_optimizer_steps"] == 3
    # with t1 features the final latents are stored beside them and outlive the chain
    x0, y = s.marked_history(2, what="x0")
    f, _ = s.marked_history(2)
    assert x0.shape == f.shape and not torch.allclose(x0, f)
    assert int(y.sum()) == goods
    last = s.load_generated(1)
    assert torch.allclose(x0[config.batch_size:], last["x0"].float())


def test_lora_targets_setting_and_old_sessions():
    assert set(LORA_TARGETS["attention"]) < set(LORA_TARGETS["attention_ff"])
    assert HeroConfig().lora_targets == "attention_ff"
    with pytest.raises(ValueError, match="lora_targets"):
        HeroConfig(lora_targets="everything").validate()
    old = HeroConfig().to_json()
    old.pop("lora_targets")
    assert HeroConfig.from_json(json.loads(json.dumps(old))).lora_targets == "attention"
    # hero's update is the denoising one; the baselines keep theirs
    assert HeroConfig(method="hero").update == "rwr"
    assert HeroConfig(method="ddpo-binary").update == "ppo"
    assert HeroConfig(method="rwr-binary").update == "rwr"
    assert not HeroConfig(method="rwr-binary").uses_encoder


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_sets_each_steps_learning_rate_and_restores_it(schedule):
    """cosine: lr_k = lr (1 + cos(pi k / K)) / 2 over a round's K steps; constant: lr throughout;
    either way the optimizer holds lr again afterwards (a saved state starts the next round at lr)."""
    import math
    be = tiny_backend()
    sched = be.schedule(4)
    popt = PolicyOptimizer(be.lora_parameters(),
                           PolicyConfig(lr=2e-3, train_batch_size=2, lr_schedule=schedule).validate())
    seen, step = [], popt.opt.step

    def record(*a, **k):
        seen.append(popt.opt.param_groups[0]["lr"])
        return step(*a, **k)
    popt.opt.step = record
    x0 = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(2)) * 0.5
    m = denoise_update(be.denoiser(guidance_scale=1.0), x0, torch.ones(3), sched, popt,
                       torch.Generator().manual_seed(0), steps=8, samples_per_step=4)
    assert m["optimizer_steps"] == 8
    want = [2e-3 * (1 if schedule == "constant" else (1 + math.cos(math.pi * k / 8)) / 2)
            for k in range(8)]
    assert seen == pytest.approx(want)
    assert popt.opt.param_groups[0]["lr"] == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="lr_schedule must be 'constant' or 'cosine'"):
        PolicyConfig(lr_schedule="linear").validate()
