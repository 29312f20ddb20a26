"""Feedback-guided noise, representation learning, reward, policy update, feedback contract."""
import json
import math
from pathlib import Path

import pytest
import torch

from hero_engine.feedback import Marks, MarksError, best_from_candidates
from hero_engine.harness.evaluator import SimulatedEvaluator
from hero_engine.guidance import initial_noise, next_noise_pool
from hero_engine.policy import PolicyConfig, PolicyOptimizer, UpdateRejected, d3po_update, ppo_update
from hero_engine.representation import (RepresentationConfig, RepresentationNet,
                                        RepresentationTrainer, sample_triplets, triplet_loss)
from hero_engine.reward import advantages, similarity_reward
from hero_engine.sampling import DDIMSchedule, sample_with_logprob, trajectory_log_prob


def gen(s):
    return torch.Generator().manual_seed(s)


# ---- guidance -------------------------------------------------------------------------------

def test_round0_noise_is_standard_normal():
    x, ids = initial_noise(64, (4, 8, 8), gen(0))
    assert (ids == -1).all()
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


def test_perturbation_statistics_and_split():
    shape = (4, 16, 16)
    best = torch.randn(shape, generator=gen(1))
    pool = torch.randn(3, *shape, generator=gen(2))
    x, ids = initial_noise(64, shape, gen(3), best, pool, beta=0.5, epsilon=0.1)
    assert (ids[:32] == -2).all() and (ids[32:] >= 0).all() and (ids[32:] < 3).all()
    # xi = sqrt(1 - eps^2) c + eps n : std ~ 1, corr(xi, c) ~ 0.995
    c = torch.stack([best if i == -2 else pool[i] for i in ids.tolist()])
    corr = torch.nn.functional.cosine_similarity((x - x.mean()).flatten(1), (c - c.mean()).flatten(1))
    assert corr.mean().item() == pytest.approx(0.995, abs=0.003)
    assert x.std().item() == pytest.approx(1.0, abs=0.05)
    resid = x - math.sqrt(1 - 0.01) * c
    assert resid.std().item() == pytest.approx(0.1, abs=0.005)



def test_fresh_ratio_keeps_part_of_the_batch_standard_normal():
    """Option (not HERO): the last floor(r N) samples are N(0, I), the beta split holds for the
    rest; r = 0 is the official behaviour, draw for draw."""
    shape = (4, 16, 16)
    best = torch.randn(shape, generator=gen(1))
    pool = torch.randn(3, *shape, generator=gen(2))
    x, ids = initial_noise(64, shape, gen(3), best, pool, beta=0.5, fresh_ratio=0.25)
    assert (ids[:24] == -2).all() and (ids[24:48] >= 0).all() and (ids[48:] == -1).all()
    near = torch.nn.functional.cosine_similarity(x[48:].flatten(1), best.flatten()[None])
    assert near.abs().max() < 0.2          # independent of the best noise
    assert x[48:].std().item() == pytest.approx(1.0, abs=0.05)
    x0, ids0 = initial_noise(64, shape, gen(3), best, pool, beta=0.5)
    x1, ids1 = initial_noise(64, shape, gen(3), best, pool, beta=0.5, fresh_ratio=0.0)
    assert torch.equal(x0, x1) and torch.equal(ids0, ids1)
    with pytest.raises(ValueError, match="fresh_ratio"):
        initial_noise(8, shape, gen(0), best, pool, fresh_ratio=1.0)

def test_guided_noise_is_reproducible():
    best = torch.randn(2, 4, 4)
    pool = torch.randn(2, 2, 4, 4)
    a = initial_noise(8, (2, 4, 4), gen(7), best, pool)
    b = initial_noise(8, (2, 4, 4), gen(7), best, pool)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_pool_seeds_everything_from_best():
    """Official code crashed drawing from an empty pool (hero_spec 4, 10.7)."""
    best = torch.randn(2, 4, 4)
    noises = torch.randn(5, 2, 4, 4)
    pool = next_noise_pool(noises, good=[3], new_best=3)
    assert len(pool) == 0
    x, ids = initial_noise(8, (2, 4, 4), gen(0), best, pool)
    assert (ids == -2).all()
    assert torch.nn.functional.cosine_similarity(x.flatten(1), best.flatten()[None]).min() > 0.9


def test_beta_zero_uniform_over_pool_and_best():
    best = torch.randn(1, 2, 2)
    pool = torch.randn(3, 1, 2, 2)
    _, ids = initial_noise(4000, (1, 2, 2), gen(0), best, pool, beta=0.0)
    frac_best = (ids == -2).float().mean().item()
    assert frac_best == pytest.approx(0.25, abs=0.03)


def test_noise_pool_excludes_new_best():
    noises = torch.arange(5.0).reshape(5, 1)
    pool = next_noise_pool(noises, good=[0, 2, 4], new_best=2)
    assert pool.flatten().tolist() == [0.0, 4.0]


# ---- representation ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 64, 64), (3, 32, 32), (4, 128, 96), (16, 20, 20)])
def test_representation_any_latent_size(shape):
    net = RepresentationNet(shape[0])
    h = net.trunk(torch.randn(2, *shape))
    z = net(torch.randn(2, *shape))
    assert h.shape == (2, 2048) and (h >= 0).all()
    assert z.shape == (2, 512)


def test_representation_wrong_channels_is_clear():
    net = RepresentationNet(4)
    with pytest.raises(ValueError, match="expects latents"):
        net.trunk(torch.randn(2, 3, 32, 32))


def test_triplet_distance_is_per_sample():
    """hero_spec 10.2: the official code took the cosine over the batch axis."""
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    # sample 0: d(a,p)=0, d(a,n)=1 -> loss 0 ; sample 1: d(a,p)=0.5, d(a,n)=0 -> 1.0 ; mean 0.5
    assert triplet_loss(a, p, n, margin=0.5).item() == pytest.approx(0.5)
    assert triplet_loss(a, p, n, margin=0.5, official_dim0_bug=True).item() != pytest.approx(0.5)


def test_triplet_loss_falls_on_separable_data():
    g = gen(0)
    base = torch.randn(1, 4, 16, 16, generator=g)
    good = base + 0.3 * torch.randn(10, 4, 16, 16, generator=g)
    bad = -base + 0.3 * torch.randn(10, 4, 16, 16, generator=g)
    feats = torch.cat([good, bad])
    tr = RepresentationTrainer(4, RepresentationConfig(lr=1e-4, epochs=60), seed=0)
    losses = tr.train_round(feats, good[0], list(range(10)), list(range(10, 20)), 0, gen(1))
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    # the learned reward ranks good above bad
    h = tr.features(feats)
    r = similarity_reward(h, tr.features(good[:1])[0])
    assert r[:10].mean() > r[10:].mean()


def test_triplets_exclude_best_and_handle_empty_positive_pool():
    p, q = sample_triplets(100, good=[1, 2], bad=[0, 3], best=2, generator=gen(0))
    assert set(p.tolist()) == {1} and set(q.tolist()) <= {0, 3}
    p, _ = sample_triplets(10, good=[2], bad=[0], best=2, generator=gen(0))
    assert set(p.tolist()) == {2}


def test_encoder_state_continues():
    tr = RepresentationTrainer(3, RepresentationConfig(epochs=2), seed=0)
    feats = torch.randn(4, 3, 8, 8)
    tr.train_round(feats, feats[0], [0, 1], [2, 3], 0, gen(0))
    sd = tr.state_dict()
    tr2 = RepresentationTrainer(3, RepresentationConfig(epochs=2), seed=123)
    tr2.load_state_dict(sd)
    assert torch.equal(tr.features(feats), tr2.features(feats))
    assert len(tr2.opt.state) > 0


# ---- reward -----------------------------------------------------------------------------------

def test_reward_range_and_best_is_one():
    net = RepresentationNet(4)
    f = torch.randn(16, 4, 32, 32)
    h = net.trunk(f)
    r = similarity_reward(h, h[5])
    assert (r >= 0.5 - 1e-6).all() and (r <= 1 + 1e-6).all()
    assert r[5].item() == pytest.approx(1.0, abs=1e-6)


def test_advantages_whiten_and_clip():
    a = advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert a.mean().abs() < 1e-6 and a.std(unbiased=False).item() == pytest.approx(1, abs=1e-5)
    big = advantages(torch.tensor([0.0] * 99 + [1.0]), clip=5.0)
    assert big.max().item() == 5.0


# ---- policy -----------------------------------------------------------------------------------

class TinyPolicy(torch.nn.Module):
    """eps_theta(x) = base(x) + lora(x): a frozen conv plus a trainable low-rank 1x1 'LoRA'."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.down = torch.nn.Parameter(torch.randn(1, 2) * 0.5)
        self.up = torch.nn.Parameter(torch.zeros(2, 1))
        self.base.requires_grad_(False)

    def forward(self, x, t, ab, idx):
        w = self.up @ self.down
        return self.base(x) + torch.einsum("oi,bihw->bohw", w, x)


def make_traj(policy, n=8, steps=6):
    ac = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    sched = DDIMSchedule.from_alphas_cumprod(ac, steps)
    x = torch.randn(n, 2, 6, 6, generator=gen(0))
    return sample_with_logprob(policy, x, sched, 1.0, generator=gen(1))


def test_ppo_step_raises_advantage_weighted_log_prob():
    torch.manual_seed(0)
    pol = TinyPolicy()
    traj = make_traj(pol)
    adv = torch.tensor([1.0, -1.0] * 4)
    popt = PolicyOptimizer({"down": pol.down, "up": pol.up},
                           PolicyConfig(lr=1e-4, timesteps_per_sample=6, clip_range=10.0,
                                        train_batch_size=8, grad_accum=1))

    def objective():
        with torch.no_grad():
            n, T = traj.log_probs.shape
            tot = 0.0
            for s in range(T):
                lp = trajectory_log_prob(pol, traj, torch.arange(n), torch.full((n,), s))
                tot += (adv * (lp - traj.log_probs[:, s])).sum().item()
            return tot

    before = objective()
    assert before == pytest.approx(0.0, abs=1e-4)  # ratio == 1 before the first step
    m = ppo_update(pol, traj, adv, popt, gen(2))
    assert m["optimizer_steps"] >= 1
    assert m["ratio"] == pytest.approx(1.0, abs=1e-3) or m["optimizer_steps"] > 1
    assert objective() > before + 1e-6
    assert pol.base.weight.grad is None  # only LoRA parameters get gradients


def test_ppo_schedule_counts_match_hero():
    """64 samples, bs 2, 5 timesteps, accumulation 4 -> 160 backward passes, 8 optimizer steps."""
    pol = TinyPolicy()
    traj = make_traj(pol, n=64, steps=10)
    popt = PolicyOptimizer({"down": pol.down, "up": pol.up}, PolicyConfig())
    m = ppo_update(pol, traj, torch.randn(64), popt, gen(0))
    assert m["backward_passes"] == 160 and m["optimizer_steps"] == 8


def test_nan_update_is_rejected_and_lora_kept():
    pol = TinyPolicy()
    traj = make_traj(pol)
    with torch.no_grad():
        pol.up.fill_(0.1)
    before = (pol.up.detach().clone(), pol.down.detach().clone())
    popt = PolicyOptimizer({"down": pol.down, "up": pol.up}, PolicyConfig())
    adv = torch.full((8,), float("nan"))
    with pytest.raises(UpdateRejected, match="previous LoRA kept"):
        ppo_update(pol, traj, adv, popt, gen(0))
    assert torch.equal(pol.up, before[0]) and torch.equal(pol.down, before[1])


def test_d3po_prefers_good_trajectories():
    torch.manual_seed(0)
    pol = TinyPolicy()
    traj = make_traj(pol, n=2)
    good, bad = [0], [1]
    popt = PolicyOptimizer({"down": pol.down, "up": pol.up},
                           PolicyConfig(lr=1e-4, timesteps_per_sample=6, d3po_beta=1.0))
    m = d3po_update(pol, traj, good, bad, popt, gen(1))
    assert m["loss"] == pytest.approx(math.log(2), abs=0.05)
    with torch.no_grad():
        n, T = traj.log_probs.shape
        gain = torch.zeros(n)
        for s in range(T):
            gain += trajectory_log_prob(pol, traj, torch.arange(n), torch.full((n,), s)) - traj.log_probs[:, s]
    assert gain[0] > gain[1]



@pytest.mark.parametrize("shift, moves", [(0.0, True), (1.0, False)])
def test_d3po_ratio_clip_stops_pairs_outside_the_trust_region(shift, moves):
    """As in the authors' code, each probability ratio is clipped to [1 - eps, 1 + eps]: a policy
    already far from the sampling policy (log-ratio 1.0 > log 1.1) gets no gradient from the pair."""
    torch.manual_seed(0)
    pol = TinyPolicy()
    traj = make_traj(pol, n=2)
    traj.log_probs[0] -= shift      # the good chain now looks much likelier than when sampled
    traj.log_probs[1] += shift      # and the bad one much less likely
    before = (pol.up.detach().clone(), pol.down.detach().clone())
    popt = PolicyOptimizer({"down": pol.down, "up": pol.up},
                           PolicyConfig(lr=1e-3, weight_decay=0.0, timesteps_per_sample=6))
    d3po_update(pol, traj, [0], [1], popt, gen(1))
    changed = not (torch.equal(pol.up, before[0]) and torch.equal(pol.down, before[1]))
    assert changed == moves

# ---- feedback contract --------------------------------------------------------------------------

def test_simulated_evaluator_flip_rate():
    """An inconsistent person: about flip_rate of the marks disagree with the threshold rule,
    the same ones for the same seed; 0 flips none."""
    scores = torch.linspace(0, 1, 400)
    exact = SimulatedEvaluator(lambda x, p: scores, 0.5).query(torch.zeros(400), [""] * 400, None)[0]
    noisy = SimulatedEvaluator(lambda x, p: scores, 0.5, flip_rate=0.2, seed=3)
    m1 = noisy.query(torch.zeros(400), [""] * 400, None)[0]
    wrong = len(set(m1.good) ^ set(exact.good))
    assert 50 <= wrong <= 110                       # 80 expected
    m2 = SimulatedEvaluator(lambda x, p: scores, 0.5, flip_rate=0.2, seed=3).query(
        torch.zeros(400), [""] * 400, None)[0]
    assert m2.good == m1.good
    assert SimulatedEvaluator(lambda x, p: scores, 0.5, flip_rate=0.0).query(
        torch.zeros(400), [""] * 400, None)[0].good == exact.good
    with pytest.raises(ValueError, match="flip_rate"):
        SimulatedEvaluator(lambda x, p: scores, 0.5, flip_rate=0.7)


# the marking rules as one table, shared with the front end's tests (tests/browser/js)
RULE_CASES = json.loads((Path(__file__).resolve().parents[1] / "support" / "rule_cases.json")
                        .read_text())["cases"]


@pytest.mark.parametrize("case", RULE_CASES, ids=lambda c: (c["error"] or "valid").replace("\\", ""))
def test_marks_rules(case):
    m = Marks(case["good"], case["bad"], case["best"])
    if case["error"] is None:
        m.validate(case["n"], has_current_best=case["has_current_best"])
    else:
        with pytest.raises(MarksError, match=case["error"]):
            m.validate(case["n"], has_current_best=case["has_current_best"])
    if case["js"] is not None:  # the front end agrees on valid vs not
        assert (case["js"] == []) == (case["error"] is None), case


def test_marks_text_form():
    m = Marks.parse("good: 1 3 4; best: 3", 5)
    assert m.good == (0, 2, 3) and m.bad == (1, 4) and m.best == 2
    m = Marks.parse("bad: 2, 5\nbest: keep", 5)
    assert m.bad == (1, 4) and m.best is None
    for text, msg in [("good: 0 1", "out of range"), ("good: a", "image numbers"),
                      ("nice: 1", "unknown field"), ("best: 2", "no good: list"),
                      ("good: 1; bad: 2", "either good")]:
        with pytest.raises(MarksError, match=msg):
            Marks.parse(text, 5)


def test_best_index_mapping_bug_does_not_recur():
    """hero_spec 10.1: the candidate *position* must map to a batch index."""
    good = [5, 9, 12]          # the candidate grid shows images 5, 9, 12, then the current best
    assert best_from_candidates(good, 1) == 9          # not 1
    assert best_from_candidates(good, 3) is None       # last tile = keep the current best
    m = Marks.from_good(16, good, best_from_candidates(good, 0))
    assert m.best == 5 and 5 in m.good and 1 in m.bad


def test_marks_json_types():
    with pytest.raises(MarksError, match="list of integer"):
        Marks.from_json({"good": ["1"], "bad": [0], "best": None})
    with pytest.raises(MarksError, match="'best' must be"):
        Marks.from_json({"good": [1], "bad": [0], "best": True})


def test_simulated_evaluator_follows_the_rules():
    ev = SimulatedEvaluator(lambda im, p: im.mean(dim=(1, 2, 3)), threshold=0.5)
    imgs = torch.tensor([0.1, 0.7, 0.9, 0.2]).reshape(4, 1, 1, 1).expand(4, 3, 2, 2)
    m, s = ev.query(imgs, [""] * 4, None)
    assert m.good == (1, 2) and m.best == 2
    m, _ = ev.query(imgs, [""] * 4, current_best_score=0.95)
    assert m.best is None
    m, _ = ev.query(imgs * 0, [""] * 4, None)  # nothing passes: the top one is good anyway
    assert len(m.good) == 1 and len(m.bad) == 3
    m, _ = ev.query(imgs * 0 + 1, [""] * 4, None)  # all pass: one is bad anyway
    assert len(m.bad) == 1
    assert ev.marks_used == 16


def test_reward_features_trunk_or_head():
    tr = RepresentationTrainer(3, RepresentationConfig(epochs=1, trunk_dim=64, head_dims=(32, 16)))
    f = torch.randn(5, 3, 16, 16)
    h, z = tr.features(f), tr.features(f, "head")
    assert h.shape == (5, 64) and (h >= 0).all()
    assert z.shape == (5, 16) and torch.allclose(z, tr.net.head(h))
    r = similarity_reward(z, z[2])
    assert r[2].item() == pytest.approx(1.0, abs=1e-6) and (r >= 0).all() and (r <= 1 + 1e-6).all()
