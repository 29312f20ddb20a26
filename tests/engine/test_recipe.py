"""Our ``hero`` recipe on top of the paper's: method traits, the PPO ratio of a stored session
chain, the mark-anchored reward, representation replay, and the extra samples that the
representation scores."""
import json

import pytest
import torch

from hero_engine import loop
from hero_engine.extra_samples import neighbour_labels
from hero_engine.harness.evaluator import SimulatedEvaluator
from hero_engine.policy import PolicyOptimizer, ppo_update
from hero_engine.reward import advantages, mark_anchored_reward, within_class_rank
from hero_engine.sampling import trajectory_log_prob
from hero_engine.session import METHOD_TRAITS, HeroConfig, Session

from tiny import evaluator, query_fn, tiny_backend, tiny_config


# ---- method traits ---------------------------------------------------------------------------

def test_methods_are_trait_sets_and_variants_override_them():
    for name, traits in METHOD_TRAITS.items():
        c = HeroConfig(method=name).validate()
        assert {k: getattr(c, k) for k in traits} == traits
    assert HeroConfig(method="ddpo-binary").guidance is False
    assert not HeroConfig(method="d3po").uses_encoder
    v = HeroConfig(method="hero", extra_ratio=0.0, reward="similarity").validate()
    assert v.extra_ratio == 0.0 and v.reward == "similarity" and v.guidance is True
    assert HeroConfig(method="hero", extra_ratio=0.5).extra_samples(64) == 32
    assert HeroConfig(method="hero").extra_samples(64) == 0     # measured, not kept
    with pytest.raises(ValueError, match="extra_ratio needs a learned representation"):
        HeroConfig(method="ddpo-binary", extra_ratio=1.0).validate()
    with pytest.raises(ValueError, match="mark_credit"):
        HeroConfig(mark_credit=1.0).validate()
    # traits are written out, so a session reopens with exactly what it was made with
    c = HeroConfig(method="hero", extra_ratio=0.5)
    assert HeroConfig.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_sessions_from_before_the_traits_keep_the_papers_recipe():
    old = HeroConfig(method="hero-paper").to_json()
    for k in ("guidance", "reward", "reward_features", "encoder_replay", "extra_ratio", "update",
              "mark_credit", "extra_neighbours"):
        old.pop(k)
    old["method"] = "hero"
    c = HeroConfig.from_json(old)
    assert c.method == "hero-paper" and c.reward == "similarity" and c.extra_ratio == 0


# ---- the PPO ratio of the stored chain ---------------------------------------------------------

def test_ppo_ratio_is_exactly_one_on_the_stored_chain(tmp_path):
    """The session stores the chain in fp16; the behaviour log-probs must be those of the fp16
    chain, or |log ratio| reaches 1e-4 and chains start outside the clip range."""
    torch.set_num_threads(1)
    be = tiny_backend()
    s = Session.create(tmp_path / "r", tiny_config(method="ddpo-binary"))
    batch = loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                                be.latent_shape, be.prompts)
    data = s.load_generated(0)
    assert data["latents"].dtype == torch.float16
    assert torch.equal(data["latents"].float(), batch.trajectory.latents.float())
    n, T = data["log_probs"].shape
    traj = loop.Trajectory(data["latents"].float(), data["log_probs"], batch.trajectory.schedule,
                           data["eta"])
    with torch.no_grad():
        for t in range(T):
            lp = trajectory_log_prob(be.denoiser(), traj, torch.arange(n), torch.full((n,), t))
            ratio = torch.exp(lp - data["log_probs"][:, t])
            assert (ratio - 1).abs().max().item() < 1e-6


def test_first_ppo_minibatch_is_unclipped(tmp_path):
    torch.set_num_threads(1)
    be = tiny_backend()
    s = Session.create(tmp_path / "c", tiny_config(method="ddpo-binary"))
    loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                        be.latent_shape, be.prompts)
    data = s.load_generated(0)
    traj = loop.Trajectory(data["latents"].float(), data["log_probs"],
                           loop.DDIMSchedule(data["timesteps"], data["alpha_bars"]), data["eta"])
    n = len(traj)
    pconf = s.config.policy
    pconf.train_batch_size, pconf.grad_accum = n, 100   # one minibatch, no optimizer step before it
    popt = PolicyOptimizer(be.lora_parameters(), pconf)
    m = ppo_update(be.denoiser(), traj, torch.linspace(-1, 1, n), popt,
                   torch.Generator().manual_seed(0))
    assert m["clipfrac"] == 0.0 and abs(m["ratio"] - 1) < 1e-6


# ---- the mark-anchored reward ------------------------------------------------------------------

def test_mark_anchored_reward_never_ranks_bad_above_good():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(64, generator=g) > 0.7).float()
    s = torch.rand(64, generator=g)
    s[y == 0] += 1.0          # the bad images are *more* similar to the best than the good ones
    r = mark_anchored_reward(y, s, 0.25)
    assert r[y == 1].min() > r[y == 0].max()
    a = advantages(r)
    assert (a[y == 0] < 0).all() and (a[y == 1] > 0).all()
    # within each class the similarity orders the rewards
    for c in (0, 1):
        idx = torch.nonzero(y == c).flatten()
        assert torch.equal(torch.argsort(r[idx]), torch.argsort(s[idx]))
    assert within_class_rank(torch.tensor([3.0, 1.0, 2.0]), torch.ones(3)).tolist() == \
        pytest.approx([2 / 3, 0.0, 1 / 3])
    with pytest.raises(ValueError):
        mark_anchored_reward(y, s, 1.0)


def test_neighbour_labels_vote_of_the_nearest_marked():
    z_marked = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    p = neighbour_labels(torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 1.0]]), z_marked, y, 2)
    assert p[0] == 1.0 and p[1] == 0.0
    assert neighbour_labels(torch.tensor([[1.0, 0.0]]), z_marked, y, 10).item() == 0.5


# ---- replay and extra samples --------------------------------------------------------------------

def test_hero_trains_on_every_marked_round_and_scores_extra_samples(tmp_path):
    torch.set_num_threads(1)
    be = tiny_backend()
    ev = evaluator()
    # the PPO variant of hero (the screened recipe with extras; hero's own update is rwr)
    config = tiny_config(method="hero", extra_ratio=1.0, guided_policy=False, update="ppo")
    s = Session.create(tmp_path / "h", config)
    n = config.batch_size
    seen = []
    for k in range(2):
        m = loop.run_round(s, be, query_fn(be, ev, s), inspect=seen.append)
        # the representation saw every mark so far; the update ran over batch + extra samples
        assert m["encoder_marks"] == n * (k + 1)
        assert m["extra_samples"] == n
        bs, T = config.policy.train_batch_size, config.policy.timesteps_per_sample
        fresh = sum(1 for i in s.round_meta(k)["centre_ids"] if i == -1)   # round 1: all guided
        assert fresh == (n if k == 0 else 0)
        assert m["policy_backward_passes"] == ((fresh + n) // bs) * T
        assert m["bad_above_mean"] == 0.0
    f, y = s.marked_history(2)
    assert f.shape[0] == 2 * n and y.sum() == sum(len(s.marks_for(j).good) for j in range(2))
    extra = seen[-1].extra
    assert extra["x0"].shape == (n, *be.latent_shape)
    assert ((extra["labels"] >= 0) & (extra["labels"] <= 1)).all()
    # the paper's recipe: no replay, no extras, and its similarity can rank bad above good
    p = Session.create(tmp_path / "p", tiny_config(method="hero-paper"))
    m = loop.run_round(p, be, query_fn(be, ev, p))
    assert m["encoder_marks"] == n and "extra_samples" not in m
    assert m["policy_backward_passes"] == (n // config.policy.train_batch_size) * T


def test_extra_samples_are_reproducible_after_a_restart(tmp_path):
    """The extra samples come from a generator seeded by (seed, round): training a round again
    (e.g. after a crash) gives exactly the same LoRA."""
    torch.set_num_threads(1)
    outs = []
    for name in ("a", "b"):
        be = tiny_backend()
        s = Session.create(tmp_path / name, tiny_config(method="hero", extra_ratio=1.0))
        loop.run_round(s, be, query_fn(be, evaluator(), s))
        outs.append(be.lora_tensors())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_an_equal_score_replaces_the_best():
    ev = SimulatedEvaluator(lambda im, p: torch.tensor([1.0, 1.0, 0.0, 0.0]), threshold=0.5)
    marks, _ = ev.query(torch.zeros(4, 3, 2, 2), ["x"] * 4, current_best_score=1.0)
    assert marks.best == 0
    marks, _ = ev.query(torch.zeros(4, 3, 2, 2), ["x"] * 4, current_best_score=1.5)
    assert marks.best is None


def test_guided_chains_teach_the_representation_not_the_policy(tmp_path):
    """With ``guided_policy`` off, the policy trains on the batch's fresh-noise chains and the
    extra samples; the guided chains still count as marks for the representation. With no fresh
    chain and no extra sample the batch trains as it is."""
    torch.set_num_threads(1)
    be = tiny_backend()
    ev = evaluator()
    config = tiny_config(method="hero", fresh_ratio=0.5, extra_ratio=1.0, guided_policy=False,
                         update="ppo")
    s = Session.create(tmp_path / "g", config)
    n = config.batch_size
    loop.run_round(s, be, query_fn(be, ev, s))
    m = loop.run_round(s, be, query_fn(be, ev, s))            # round 1: half guided
    fresh = sum(1 for i in s.round_meta(1)["centre_ids"] if i == -1)
    assert fresh == n // 2
    assert m["policy_chains"] == fresh + n and m["encoder_marks"] == 2 * n
    p = Session.create(tmp_path / "p", tiny_config(method="hero", guided_policy=False,
                                                    update="ppo"))
    loop.run_round(p, be, query_fn(be, ev, p))
    m = loop.run_round(p, be, query_fn(be, ev, p))            # all guided, nothing extra
    assert "policy_chains" not in m
    assert m["policy_backward_passes"] == (n // config.policy.train_batch_size) * \
        config.policy.timesteps_per_sample
