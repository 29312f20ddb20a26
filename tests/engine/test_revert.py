"""Mark-checked updates (hero_engine/revert.py): a significant fall of the good share restarts the
update from the LoRA before the last one, at a damped learning rate."""
import math

import pytest
import torch

from hero_engine import loop
from hero_engine.feedback import Marks
from hero_engine.revert import drop_z, update_start
from hero_engine.session import HeroConfig, Session

from tiny import tiny_backend, tiny_config


def test_drop_z_is_the_two_proportion_z_of_the_fall():
    # 37 of 64 good, then 25 of 64: p = 62/128
    p = 62 / 128
    want = (37 / 64 - 25 / 64) / math.sqrt(p * (1 - p) * (2 / 64))
    assert drop_z(37, 64, 25, 64) == pytest.approx(want)
    assert drop_z(25, 64, 37, 64) == pytest.approx(-want)      # a rise is negative
    assert drop_z(64, 64, 64, 64) == 0.0 and drop_z(0, 0, 3, 6) == 0.0


def _marks(good, n=6):
    return Marks.from_good(n, range(good), 0)


def test_update_start_reverts_only_on_a_significant_fall_and_damps_each_time():
    config = HeroConfig(revert_z=2.0, revert_damping=0.5)
    anchor = {"lora": {"a": torch.ones(1)}, "policy_opt": {"o": 1}, "good": 5, "marked": 6}
    state = {"lora": {"a": torch.zeros(1)}, "policy_opt": {"o": 2}, "anchor": anchor}
    # 5/6 -> 4/6: not significant; the update starts from this batch's LoRA, the new anchor
    s = update_start(config, state, _marks(4), [])
    assert not s.reverted and s.lr_scale == 1.0 and s.lora is state["lora"]
    assert s.anchor == {"lora": state["lora"], "policy_opt": {"o": 2}, "good": 4, "marked": 6}
    # 5/6 -> 1/6 (z 2.31): back to the anchor, which stays; one earlier revert: lr / 4
    s = update_start(config, state, _marks(1), [{"reverted": True}, {"reverted": False}])
    assert s.reverted and s.lr_scale == 0.25 and s.metrics["revert_z"] > 2
    assert s.lora is anchor["lora"] and s.policy_opt == {"o": 1} and s.anchor is anchor
    # off: never reverts, stores no anchor, keeps the rate
    s = update_start(HeroConfig(), state, _marks(1), [{"reverted": True}])
    assert not s.reverted and s.anchor is None and s.lr_scale == 1.0
    with pytest.raises(ValueError, match="revert_damping"):
        HeroConfig(revert_damping=0).validate()
    with pytest.raises(ValueError, match="revert_z"):
        HeroConfig(revert_z=-1).validate()


def test_a_fall_in_the_good_share_restarts_the_update_from_the_lora_before_it(tmp_path,
                                                                             monkeypatch):
    torch.set_num_threads(1)
    be = tiny_backend()
    s = Session.create(tmp_path / "s", tiny_config(method="hero", revert_z=2.0))
    goods = iter([5, 1])                      # 5 of 6 good, then 1 of 6: z 2.31
    seen = []
    real = loop.apply_policy_update

    def spy(session, plan, denoiser, popt, *a, **kw):
        seen.append(({k: v.clone() for k, v in be.lora_tensors().items()}, popt.config.lr))
        return real(session, plan, denoiser, popt, *a, **kw)

    monkeypatch.setattr(loop, "apply_policy_update", spy)

    def query(batch):
        return _marks(next(goods)), 1.0

    m0 = loop.run_round(s, be, query)
    after0 = {k: v.clone() for k, v in be.lora_tensors().items()}
    m1 = loop.run_round(s, be, query)
    assert not m0["reverted"] and m1["reverted"] and m1["lr_scale"] == 0.5
    lr = s.config.policy.lr
    assert seen[0][1] == lr and seen[1][1] == lr / 2
    # round 1's update began from the LoRA round 0's update began from (the initial one), not
    # from round 0's result
    for k, v in seen[1][0].items():
        assert torch.equal(v, seen[0][0][k])
    assert any(not torch.equal(after0[k], seen[1][0][k]) for k in after0)
    # the anchor is stored with the state, so a resumed session checks the same way
    st = s.load_state(("anchor",))
    assert st["anchor"]["good"] == 5 and st["anchor"]["marked"] == 6
    assert s.history[-1]["reverted"] is True
