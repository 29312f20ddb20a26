"""Tests of the embedded toy domain (hero_engine.toy): data, evaluators, model loading, sampling."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hero_engine.toy.data import (PERSONAL_COLOUR, SHAPES, TASK_PROMPTS, draw, sample_batch,
                                  sample_task_scene, scene_count, scene_single, vocabulary)
from hero_engine.toy.tasks import TASKS, ToyTask
from hero_engine.toy.text import BOS, PAD, UNK, WordTokenizer


def task_truth(task: str, items: list) -> bool:
    """Ground truth of a task's intent for a drawn scene (used to test the pixel evaluators)."""
    if task == "count":
        return len(items) == 3 and all(s == "circle" for s, *_ in items)
    if task == "colour":
        return all(c == PERSONAL_COLOUR for _, c, *_ in items)
    if task == "spatial":
        red = [it for it in items if it[1] == "red"]
        blue = [it for it in items if it[1] == "blue"]
        if not red or not blue:
            return False
        dy, dx = blue[0][2] - red[0][2], blue[0][3] - red[0][3]
        return dy > abs(dx)
    if task == "removal":
        return not any(s == "cross" and c == "red" for s, c, *_ in items)
    raise KeyError(task)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy is tiny: one thread is fastest, above all on a shared CPU (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hero_engine.toy import load_toy_model

    return load_toy_model()


def test_data_is_deterministic():
    a, pa = sample_batch(np.random.default_rng(7), 16)
    b, pb = sample_batch(np.random.default_rng(7), 16)
    c, _ = sample_batch(np.random.default_rng(8), 16)
    assert a.shape == (16, 3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_task_prompts_are_in_training_data():
    _, prompts = sample_batch(np.random.default_rng(0), 400)
    for p in TASK_PROMPTS.values():
        assert p in prompts


def test_tokenizer_covers_grammar():
    tok = WordTokenizer(vocabulary(), 12)
    _, prompts = sample_batch(np.random.default_rng(1), 300)
    ids = tok(prompts)
    assert ids.shape == (300, 12) and not (ids == UNK).any()
    empty = tok([""])[0]
    assert empty[0] == BOS and (empty[1:] == PAD).all()
    assert tok(["a purple circle"])[0, 2] == UNK


@pytest.mark.parametrize("name", list(TASKS))
def test_evaluator_on_clean_data(name):
    """Each evaluator agrees with the drawn ground truth on >= 95% of clean images (pos and neg)."""
    rng = np.random.default_rng(11)
    items = [sample_task_scene(rng, name)[0] for _ in range(150)]
    if name == "count":  # three shapes that are not circles, and one big circle, are failures
        items += [scene_count(rng, n=3, shape=s)[0] for s in ("square", "triangle", "cross") for _ in range(10)]
        items += [scene_single(rng, "red", "circle")[0] for _ in range(10)]
    if name == "colour":
        items += [scene_single(rng, PERSONAL_COLOUR, s)[0] for s in SHAPES for _ in range(5)]
    x = torch.from_numpy(np.stack([draw(i) for i in items]))
    truth = torch.tensor([task_truth(name, i) for i in items])
    task = TASKS[name]
    ok = task.success(x, [task.prompt] * len(items))
    assert ok.dtype == torch.bool and ok.shape == (len(items),)
    assert truth.any() and (~truth).any()
    assert (ok == truth).float().mean() >= 0.95
    # an empty canvas is never a success, except for removal (nothing unwanted in it); noise never is
    empty = TASKS[name].success(torch.full((2, 3, 32, 32), 0.5))
    assert bool(empty.all()) == (name == "removal")
    noise = TASKS[name].success(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert not noise.any()


def test_task_fields():
    assert set(TASKS) == {"count", "colour", "spatial", "removal"}
    for name, t in TASKS.items():
        assert isinstance(t, ToyTask) and t.name == name and t.prompt == TASK_PROMPTS[name]
        s = t.score(torch.rand(3, 3, 32, 32), [t.prompt] * 3)
        assert s.shape == (3,) and s.dtype == torch.float32


def test_load_offline_and_denoiser(model):
    from hero_engine.toy.model import WEIGHTS_DIR

    assert (WEIGHTS_DIR / "toy_model.safetensors").stat().st_size <= 20 * 2 ** 20
    names = [n for n, _ in model.unet.named_modules()]
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("to_out.0") for n in names)
    assert model.latent_shape == (3, 32, 32)
    assert model.alphas_cumprod.shape == (1000,) and model.alphas_cumprod.dtype == torch.float32
    emb = model.encode_prompts(["circles", ""])
    assert emb.shape[0] == 2 and emb.dim() == 3
    x = torch.randn(4, 3, 32, 32)
    t = torch.tensor([999, 500, 20, 1])
    ab = model.alphas_cumprod[t]
    idx = torch.arange(4)
    with torch.no_grad():
        e1 = model.denoiser(["circles"], 3.0)(x, t, ab, idx)
        prompts = ["circles", "a square", "circles", "a square"]
        e2 = model.denoiser(prompts, 3.0)(x, t, ab, idx)
        ec = model.denoiser(prompts, 1.0)(x, t, ab, idx)
        ec_perm = model.denoiser(prompts, 1.0)(x[[2, 0]], t[[2, 0]], ab[[2, 0]], idx[[2, 0]])
    assert e1.shape == x.shape and torch.isfinite(e1).all()
    assert torch.allclose(e1[[0, 2]], e2[[0, 2]], atol=1e-4)  # index picks each sample's prompt
    assert not torch.allclose(e1[1], e2[1], atol=1e-4)
    assert torch.allclose(ec_perm, ec[[2, 0]], atol=1e-4)
    assert torch.allclose(model.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])),
                          torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_short_sampling_in_range(model):
    from hero_engine.toy.measure import sample_images

    imgs = sample_images(model, "a blue square", 4, seed=0, steps=5)
    assert imgs.shape == (4, 3, 32, 32)
    assert imgs.min() >= 0 and imgs.max() <= 1


def test_base_success_is_a_real_rate(model):
    """A real measurement (64 fresh samples, fixed seed; 4 DDIM steps to keep the suite fast):
    the base model succeeds sometimes, not always."""
    from hero_engine.toy.measure import sample_images

    task = TASKS["colour"]
    imgs = sample_images(model, task.prompt, 64, seed=2024, steps=4, guidance_scale=task.guidance_scale)
    rate = task.success(imgs, [task.prompt] * 64).float().mean().item()
    assert 0.0 < rate < 1.0


def test_schedule_and_fallback_sampler_match(model):
    """alphas_cumprod equals diffusers' DDPMScheduler's; diffusers' DDIMScheduler with measure's
    settings (once measure.py's fallback, now the reference here) reproduces the engine's sampler
    (same generator, same noise)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from hero_engine.sampling import DDIMSchedule, sample_with_logprob

    ac = DDPMScheduler(**model.config["scheduler"]).alphas_cumprod
    assert torch.equal(ac, model.alphas_cumprod)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    den = model.denoiser(["a square"], 3.0)
    with torch.no_grad():
        sched = DDIMSchedule.from_alphas_cumprod(model.alphas_cumprod, 4, steps_offset=1)
        a = sample_with_logprob(den, x_T, sched, eta=1.0,
                                generator=torch.Generator().manual_seed(1)).x0
        sc = model.config["scheduler"]
        ddim = DDIMScheduler(num_train_timesteps=sc["num_train_timesteps"],
                             beta_start=sc["beta_start"], beta_end=sc["beta_end"],
                             beta_schedule=sc["beta_schedule"], clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
        ddim.set_timesteps(4)
        gen = torch.Generator().manual_seed(1)
        b, idx = x_T.clone(), torch.arange(2)
        for t in ddim.timesteps:
            tt = t.expand(2)
            eps = den(b, tt, model.alphas_cumprod[tt], idx)
            b = ddim.step(eps, t, b, eta=1.0, generator=gen).prev_sample
    assert torch.allclose(a, b, atol=1e-4)
