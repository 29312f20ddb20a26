"""Session durability: atomic writes, resume after a kill, clear errors on bad files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hero_engine import loop
from hero_engine.feedback import Marks, MarksError
from hero_engine.session import HeroConfig, Session, SessionError, valid_session_id

from tiny import evaluator, query_fn, tiny_backend, tiny_config, train_again

HERE = Path(__file__).resolve().parent


def test_full_rounds_and_reopen(tmp_path):
    s = Session.create(tmp_path / "s1", tiny_config())
    be = tiny_backend()
    ev = evaluator()
    before = be.lora_tensors()
    for _ in range(3):
        loop.run_round(s, be, query_fn(be, ev, s))
    assert s.round == 3 and s.marks_used == 18 and s.done
    assert len(s.history) == 3
    h = s.history[-1]
    for key in ("labels_used", "good_rate", "triplet_loss_first", "triplet_loss_last",
                "reward_std", "policy_loss", "policy_optimizer_steps"):
        assert key in h
    after = be.lora_tensors()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the LoRA moved
    # reopen: everything survives
    s2 = Session.open(tmp_path / "s1")
    assert s2.round == 3 and s2.marks_used == 18 and s2.best == s.best
    st = s2.load_state()
    assert set(st) == {"lora", "policy_opt", "encoder", "best", "pool"}
    assert all(torch.equal(st["lora"][k], after[k]) for k in after)
    assert s2.best_image_path().exists()
    for k in range(3):
        assert s2.marks_for(k) is not None
        assert len(list((s2.round_dir(k) / "images").glob("*.png"))) == 6
    # the latest state folder and the one before it (for repair) are kept, nothing else
    assert sorted(p.name for p in (tmp_path / "s1").glob("state-*")) == ["state-0002",
                                                                         "state-0003"]
    assert s2.prev_state_dir.name == "state-0002"
    assert not list((tmp_path / "s1").rglob("*.tmp"))
    # the trajectory is kept for the last trained round only (repair retrains it from its marks)
    assert "latents" in s2.load_generated(2)
    assert all("latents" not in s2.load_generated(k) for k in (0, 1))


def test_guided_noise_uses_session_best(tmp_path):
    s = Session.create(tmp_path / "g", tiny_config())
    be = tiny_backend()
    ev = evaluator()
    loop.run_round(s, be, query_fn(be, ev, s))
    noises, ids = loop.plan_initial_noise(s, be.latent_shape)
    assert (ids[:3] == -2).all()  # beta = 0.5 of 6
    best_noise = s.load_state()["best"]["noise"]
    cos = torch.nn.functional.cosine_similarity(noises[:3].flatten(1), best_noise.flatten()[None])
    assert (cos > 0.95).all()
    nog = Session.create(tmp_path / "ng", tiny_config(method="hero-no-guidance"))
    loop.run_round(nog, be, query_fn(be, ev, nog))
    _, ids = loop.plan_initial_noise(nog, be.latent_shape)
    assert (ids == -1).all()


def test_kill_during_training_and_resume(tmp_path):
    """Run a round in a subprocess, SIGKILL it mid-training, reopen: the session is at the last
    completed round with the interrupted round's marks; training it again gives exactly the LoRA
    an uninterrupted run gives."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(HERE / "_round_worker.py"), str(ref), "full"], check=True,
                   env=env, timeout=600)
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(HERE / "_round_worker.py"), str(killed),
                          "kill-in-training"], env=env)
    t0 = time.time()
    while not (killed / "TRAINING").exists():
        assert p.poll() is None, "worker ended before training"
        assert time.time() - t0 < 600
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    s = Session.open(killed)
    assert s.round == 1 and s.marks_used == 6         # round 0 complete, round 1 not
    marks = s.marks_for(1)
    assert marks is not None and marks == Session.open(ref).marks_for(1)
    torch.set_num_threads(1)  # as the worker: bit-identical float reductions
    train_again(s)
    a, b = Session.open(ref).load_state(), Session.open(killed).load_state()
    assert Session.open(killed).round == 2
    for k in a["lora"]:
        assert torch.equal(a["lora"][k], b["lora"][k]), k
    assert torch.equal(a["best"]["noise"], b["best"]["noise"])


def test_marks_are_written_once_and_validated(tmp_path):
    s = Session.create(tmp_path / "m", tiny_config())
    be = tiny_backend()
    with pytest.raises(SessionError, match="no generated batch"):
        s.record_marks(0, Marks([0], [1, 2, 3, 4, 5], 0))
    loop.generate_round(s, be.denoiser(), be.decode, be.schedule(4), be.latent_shape, be.prompts)
    with pytest.raises(MarksError, match="not marked"):
        s.record_marks(0, Marks([0], [1], 0))
    with pytest.raises(SessionError, match="stale"):
        s.record_marks(3, Marks([0], [1, 2, 3, 4, 5], 0))
    s.record_marks(0, Marks([0], [1, 2, 3, 4, 5], 0))
    with pytest.raises(SessionError, match="already has marks"):
        s.record_marks(0, Marks([1], [0, 2, 3, 4, 5], 1))
    assert Session.open(tmp_path / "m").marks_for(0).best == 0
    with pytest.raises(SessionError, match="already marked"):
        loop.generate_round(s, be.denoiser(), be.decode, be.schedule(4), be.latent_shape,
                            be.prompts)
    assert not list((tmp_path / "m").rglob("*.tmp"))  # atomic writes leave no temp files


def test_bad_session_files_are_named(tmp_path):
    s = Session.create(tmp_path / "b", tiny_config())
    meta = json.loads((tmp_path / "b" / "session.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "b" / "session.json").write_text(json.dumps(meta))
    with pytest.raises(SessionError, match="format version 99"):
        Session.open(tmp_path / "b")
    (tmp_path / "b" / "session.json").write_text('{"format_version": 1, "conf')
    with pytest.raises(SessionError, match=r"session\.json is damaged"):
        Session.open(tmp_path / "b")
    with pytest.raises(SessionError, match="missing file"):
        Session.open(tmp_path / "nothing")
    # a truncated state file names the file
    s = Session.create(tmp_path / "t", tiny_config())
    be = tiny_backend()
    ev = evaluator()
    loop.run_round(s, be, query_fn(be, ev, s))
    lora = s.state_dir / "lora.pt"
    good = lora.read_bytes()
    lora.write_bytes(good[:100])
    with pytest.raises(SessionError, match=r"lora\.pt is truncated.*hero_engine repair"):
        Session.open(tmp_path / "t")
    # damaged but of the same size (the cheap check on open passes): loading names the file
    lora.write_bytes(b"\0" * len(good))
    with pytest.raises(SessionError, match="lora.pt is damaged"):
        Session.open(tmp_path / "t").load_state()


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 65, "a b", "..", "ok.dots"])
def test_session_ids(bad):
    with pytest.raises(SessionError, match="invalid session id"):
        valid_session_id(bad)
    assert valid_session_id("my_session-01") == "my_session-01"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown method"):
        HeroConfig(method="foo").validate()
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        HeroConfig(batch_size=1).validate()
    c = HeroConfig.from_json(tiny_config().to_json())
    assert c == tiny_config()


def test_config_with_the_old_cfg_key_opens(tmp_path):
    """Sessions written before the guidance scale was named ``guidance_scale`` stored it as
    ``"cfg"``: they open with that scale, and new sessions write the new key."""
    Session.create(tmp_path / "old", tiny_config(guidance_scale=5.0))
    f = tmp_path / "old" / "session.json"
    meta = json.loads(f.read_text())
    assert "cfg" not in meta["config"] and meta["config"]["guidance_scale"] == 5.0
    del meta["config"]["guidance_scale"]
    meta["config"]["cfg"] = 7.5
    f.write_text(json.dumps(meta))
    s = Session.open(tmp_path / "old")
    assert s.config.guidance_scale == 7.5
    assert s.config.to_json()["guidance_scale"] == 7.5 and "cfg" not in s.config.to_json()


def test_next_batch_eta_from_the_last_round(tmp_path):
    """The wait after Submit is the last round's training plus the last batch's generation,
    kept in session.json across a restart."""
    torch.set_num_threads(1)
    s = Session.create(tmp_path / "eta", tiny_config())
    assert s.next_batch_eta() == {"train_seconds": None, "generate_seconds": None, "seconds": None}
    be = tiny_backend()
    ev = evaluator()
    b = loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                            be.latent_shape, be.prompts)
    eta = s.next_batch_eta()
    assert eta["generate_seconds"] > 0 and eta["train_seconds"] is None and eta["seconds"] is None
    marks, _ = ev.query(b.images, be.prompts * b.size, None)
    s.record_marks(b.round, marks)
    plan = loop.prepare_learning(s)
    popt = be.policy_optimizer(s)
    loop.apply_policy_update(s, plan, be.denoiser(), popt, conditional=be.denoiser(guidance_scale=1.0))
    m = loop.complete_round(s, plan, be.lora_tensors(), popt)
    eta = Session.open(s.path).next_batch_eta()
    assert eta["train_seconds"] == pytest.approx(m["train_seconds"], abs=1e-3)
    assert m["train_seconds"] >= m["policy_seconds"] > 0
    assert eta["seconds"] == pytest.approx(eta["train_seconds"] + eta["generate_seconds"])
    assert s.history[-1]["train_seconds"] == m["train_seconds"]
