"""DDIM(eta) as a Gaussian: parity with diffusers, log-prob parity, schedules."""

import pytest
import torch
from diffusers import DDIMScheduler

from hero_engine.sampling import (DDIMSchedule, ddim_step_gaussian, gaussian_log_prob,
                                  sample_with_logprob, trajectory_log_prob)


def sd_scheduler():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                         clip_sample=False, timestep_spacing="leading")


def linear_denoiser(scale=0.3):
    w = torch.nn.Parameter(torch.tensor(scale))

    def den(x, t, ab, idx):
        return w * x + 0.01 * t.float().reshape(-1, 1, 1, 1) / 1000
    return den, w


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_timesteps_match_diffusers_leading(steps):
    s = sd_scheduler()
    s.set_timesteps(steps)
    d = DDIMSchedule.from_alphas_cumprod(s.alphas_cumprod, steps)
    assert torch.equal(d.timesteps, s.timesteps.long())
    assert d.alpha_bars[0] == pytest.approx(float(s.alphas_cumprod[s.timesteps[0]]))
    # last step goes to diffusers' final alpha (set_alpha_to_one=False -> abar_0)
    assert d.alpha_bars[-1] == pytest.approx(float(s.final_alpha_cumprod))


def test_step_eta0_matches_diffusers():
    s = sd_scheduler()
    s.set_timesteps(20)
    d = DDIMSchedule.from_alphas_cumprod(s.alphas_cumprod, 20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 7, 19):
        ref = s.step(eps, s.timesteps[i], x, eta=0.0).prev_sample
        mean, std = ddim_step_gaussian(x, eps, d.alpha_bars[i], d.alpha_bars[i + 1], eta=0.0)
        assert torch.allclose(mean, ref, atol=1e-5)
        assert float(std.max()) == 0.0


def test_step_eta1_variance_matches_diffusers():
    s = sd_scheduler()
    s.set_timesteps(50)
    d = DDIMSchedule.from_alphas_cumprod(s.alphas_cumprod, 50)
    x = torch.randn(1, 4, 4, 4)
    eps = torch.randn(1, 4, 4, 4)
    for i in (0, 25, 49):
        t = int(s.timesteps[i])
        ref_var = s._get_variance(t, t - s.config.num_train_timesteps // s.num_inference_steps)
        _, std = ddim_step_gaussian(x, eps, d.alpha_bars[i], d.alpha_bars[i + 1], eta=1.0)
        assert float(std.flatten()[0]) ** 2 == pytest.approx(float(ref_var), rel=1e-4)  # diffusers computes in fp32
        # the eta=1 mean equals diffusers' sample minus its noise term
        gen = torch.Generator().manual_seed(3)
        out = s.step(eps, t, x, eta=1.0, generator=gen).prev_sample
        gen = torch.Generator().manual_seed(3)
        z = torch.randn(x.shape, generator=gen)
        mean, std = ddim_step_gaussian(x, eps, d.alpha_bars[i], d.alpha_bars[i + 1], eta=1.0)
        assert torch.allclose(mean + std * z, out, atol=1e-5)


def test_spec_std_range():
    d = DDIMSchedule.from_alphas_cumprod(sd_scheduler().alphas_cumprod, 50)
    x = torch.zeros(1, 1, 1, 1)
    stds = [float(ddim_step_gaussian(x, x, d.alpha_bars[i], d.alpha_bars[i + 1], 1.0)[1])
            for i in range(50)]
    assert stds[0] == pytest.approx(0.454, abs=2e-3)  # hero_spec 7.2
    assert stds[-1] == pytest.approx(0.021, abs=2e-3)


def test_log_prob_is_mean_over_elements():
    x = torch.randn(3, 2, 4, 4)
    mean = torch.randn(3, 2, 4, 4)
    std = torch.full((3, 1, 1, 1), 0.7)
    lp = gaussian_log_prob(x, mean, std)
    ref = torch.distributions.Normal(mean, 0.7).log_prob(x).mean(dim=(1, 2, 3))
    assert torch.allclose(lp, ref, atol=1e-5)


def test_recomputed_log_prob_equals_stored_and_ratio_is_one():
    s = sd_scheduler()
    d = DDIMSchedule.from_alphas_cumprod(s.alphas_cumprod, 10)
    den, w = linear_denoiser()
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    traj = sample_with_logprob(den, x_T, d, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert traj.latents.shape == (4, 11, 4, 8, 8)
    assert torch.equal(traj.x_T, x_T)
    for step in range(10):
        idx = torch.arange(4)
        lp = trajectory_log_prob(den, traj, idx, torch.full((4,), step))
        assert torch.allclose(lp, traj.log_probs[:, step], atol=1e-5)
        assert torch.allclose(torch.exp(lp - traj.log_probs[:, step]), torch.ones(4), atol=1e-4)
    # mixed timesteps per sample (the PPO micro-batch case)
    lp = trajectory_log_prob(den, traj, torch.tensor([3, 0]), torch.tensor([9, 2]))
    assert torch.allclose(lp, torch.stack([traj.log_probs[3, 9], traj.log_probs[0, 2]]), atol=1e-5)
    # the log-prob has a gradient to the policy parameter
    lp.sum().backward()
    assert w.grad is not None and w.grad != 0


def test_sampling_is_seeded():
    d = DDIMSchedule.from_alphas_cumprod(sd_scheduler().alphas_cumprod, 5)
    den, _ = linear_denoiser()
    x = torch.randn(2, 4, 4, 4)
    a = sample_with_logprob(den, x, d, generator=torch.Generator().manual_seed(5))
    b = sample_with_logprob(den, x, d, generator=torch.Generator().manual_seed(5))
    c = sample_with_logprob(den, x, d, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)


def test_comfy_sigmas_schedule_last_step():
    """ComfyUI's ddim_uniform ends at sigma=0 (abar=1); we end on abar_0 like diffusers."""
    s = sd_scheduler()
    ac = s.alphas_cumprod
    train_sigmas = ((1 - ac) / ac).sqrt()
    s.set_timesteps(4)
    # ComfyUI ddim_uniform for 4 steps: sigmas at t = 751, 501, 251, 1, then 0
    sig = torch.cat([train_sigmas[s.timesteps], torch.zeros(1)])
    d = DDIMSchedule.from_sigmas(sig, train_sigmas)
    ref = DDIMSchedule.from_alphas_cumprod(ac, 4)
    assert torch.equal(d.timesteps, ref.timesteps)
    assert torch.allclose(d.alpha_bars, ref.alpha_bars, rtol=1e-6)
    # with alpha 1 at the end the last step would be deterministic (std 0): no log-prob
    ab1 = DDIMSchedule.from_alphas_cumprod(ac, 4, final_alpha=1.0)
    _, std = ddim_step_gaussian(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                                ab1.alpha_bars[-2], ab1.alpha_bars[-1], 1.0)
    assert float(std) == 0.0


def test_bad_inputs():
    d = DDIMSchedule.from_alphas_cumprod(sd_scheduler().alphas_cumprod, 5)
    den, _ = linear_denoiser()
    with pytest.raises(ValueError, match="empty batch"):
        sample_with_logprob(den, torch.zeros(0, 4, 4, 4), d)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        sample_with_logprob(den, torch.zeros(4, 4, 4), d)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSchedule.from_alphas_cumprod(sd_scheduler().alphas_cumprod, 0)
    with pytest.raises(ValueError, match="increase"):
        DDIMSchedule([5, 1], [0.9, 0.5, 0.99])


def _backend_with_trained_lora():
    from tiny import tiny_backend
    be = tiny_backend()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in be.lora_parameters().items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return be


def test_merged_lora_samples_as_unmerged_and_restores_every_weight_exactly():
    """Evaluation samples with the LoRA folded into W (faster); the images match the unmerged
    LoRA's to rounding, and afterwards every weight is bit-identical to before."""
    from peft.tuners.lora import LoraLayer
    be = _backend_with_trained_lora()
    before = {n: p.detach().clone() for n, p in be.unet.named_parameters()}
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn((5, *be.latent_shape), generator=g)
    sched = be.schedule(4)
    unmerged = be.decode(sample_with_logprob(be.denoiser(), x_T, sched, 1.0,
                                             generator=torch.Generator().manual_seed(3)).x0)
    # the same draws as sample_fresh(x_T=..., seed=3) makes
    merged = be.sample_fresh(5, 4, seed=3, x_T=x_T)
    assert (merged - unmerged.clamp(0, 1)).abs().max() < 1e-4
    # the LoRA did change the images (the test would pass trivially with B = 0)
    be2 = _backend_with_trained_lora()
    with torch.no_grad():
        for name, p in be2.lora_parameters().items():
            if "lora_B" in name:
                p.zero_()
    assert (be2.sample_fresh(5, 4, seed=3, x_T=x_T) - merged).abs().max() > 1e-3
    for n, p in be.unet.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any(m.merged for m in be.unet.modules() if isinstance(m, LoraLayer))


def test_merged_lora_restores_the_weights_when_sampling_fails():
    be = _backend_with_trained_lora()
    before = {n: p.detach().clone() for n, p in be.unet.named_parameters()}
    with pytest.raises(RuntimeError, match="interrupted"):
        with be.merged_lora():
            assert any(not torch.equal(p, before[n]) for n, p in be.unet.named_parameters())
            raise RuntimeError("interrupted")
    for n, p in be.unet.named_parameters():
        assert torch.equal(p, before[n]), n
