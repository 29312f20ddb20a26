"""The session store under concurrency, kills and damage (docs/session_store.md).

* concurrent exports and summaries (threads of this process and a second process) during 20 real
  round commits on the embedded toy model: no failure, the session always opens, last_export
  always right, every exported file holds the LoRA of the round it names;
* a writer with a stale view never overwrites the pointer a commit moved;
* leftovers of killed writers are cleaned when the session next opens, and only those;
* repair: a state folder deleted by hand, a truncated state file, a truncated session.json.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from hero_engine import loop
from hero_engine.feedback import Marks
from hero_engine.harness.evaluator import SimulatedEvaluator
from hero_engine.locks import FolderLock
from hero_engine.repair import RepairError, repair
from hero_engine.session import Session, SessionDamaged, SessionError

from tiny import evaluator, tiny_backend, tiny_config, train_again

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def lora_digest(lora: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(lora):
        h.update(k.encode())
        h.update(lora[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_lora(st, s, out: Path, tag: str) -> dict:
    from safetensors.torch import save_file
    if "lora" not in st:
        raise LookupError(s.round)
    f = out / f"{tag}_r{s.round:04d}.safetensors"
    tmp = f.with_suffix(".part")
    save_file({k: v.contiguous() for k, v in st["lora"].items()}, str(tmp))
    os.replace(tmp, f)
    return {"file": f.name}


def toy_session(path: Path, rounds: int):
    from hero_engine.harness.experiment import ExperimentSpec, toy_backend, toy_config
    spec = ExperimentSpec(task="colour", rounds=rounds, batch_size=4, encoder_epochs=2,
                          ppo_timesteps=1, ppo_batch=4)
    toy, task, be = toy_backend(spec)
    s = Session.create(path, toy_config(spec, 3, be.guidance_scale))
    ev = SimulatedEvaluator(task.score, task.threshold, seed=0)

    def query(batch):
        best = s.best
        m, sc = ev.query(batch.images, be.prompts * batch.size, None if best is None else best.score)
        return m, (float(sc[m.best]) if m.best is not None else None)
    return s, be, query


def test_concurrent_exports_and_summaries_during_20_commits(tmp_path):
    torch.set_num_threads(1)  # 3 threads and a process share the cores with the rounds
    rounds = 20
    sdir = tmp_path / "sess"
    out = tmp_path / "loras"
    out.mkdir()
    s, be, query = toy_session(sdir, rounds)
    digests = {}
    stop = threading.Event()
    errors, exports, counts = [], [], {"exports": 0, "summaries": 0, "lora_reads": 0}

    def exporter():  # the panel export: a fresh Session copy per request, as SessionViews does
        while not stop.is_set():
            try:
                mine = Session.open(sdir, cleanup=False)
                res = mine.export_state(lambda st, s_: write_lora(st, s_, out, "thread"))
                rec = res["last_export"]
                exports.append(rec)
                counts["exports"] += 1
                # last_export right after a 200: ours or a newer one, never an older one
                seen = Session.open(sdir, cleanup=False).info["last_export"]
                if seen["time"] < rec["time"]:
                    errors.append(f"last_export went back: {seen} after {rec}")
                if not (out / seen["file"]).is_file():
                    errors.append(f"last_export names a missing file: {seen}")
            except LookupError as e:
                if e.args[0] != 0:
                    errors.append(f"no LoRA in the state of round {e.args[0]}")
            except Exception:  # noqa: BLE001
                errors.append(traceback.format_exc())
            time.sleep(0.03)  # many per commit, and CPU left for the rounds

    def summaries():  # the sidebar: summary + the current LoRA, read while commits run
        while not stop.is_set():
            try:
                v = Session.open(sdir, cleanup=False)
                d = v.summary()
                assert len(d["history"]) == d["round"]
                counts["summaries"] += 1
                st = v.load_state(("lora",))
                assert ("lora" in st) == (v.round > 0)
                counts["lora_reads"] += 1
            except Exception:  # noqa: BLE001
                errors.append(traceback.format_exc())
            time.sleep(0.02)

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = tmp_path / "proc.json"
    proc = subprocess.Popen([sys.executable, str(HERE / "_store_worker.py"), str(sdir), str(out),
                             str(result)], env=env)
    threads = [threading.Thread(target=exporter), threading.Thread(target=exporter),
               threading.Thread(target=summaries)]
    [t.start() for t in threads]
    t0 = time.time()
    while not (tmp_path / "READY").exists():  # the second process is at work before round 0
        assert proc.poll() is None and time.time() - t0 < 300, "the worker did not start"
        time.sleep(0.05)
    try:
        for r in range(rounds):
            loop.run_round(s, be, query)
            digests[s.round] = lora_digest(be.lora_tensors())
            assert s.round == r + 1
            time.sleep(0.05)  # let the readers see every round
    finally:
        stop.set()
        [t.join(60) for t in threads]
        (tmp_path / "STOP").write_text("")
        proc.wait(60)
    p = json.loads(result.read_text())
    assert errors == [], errors[:3]
    assert p["errors"] == [], p["errors"][:3]
    assert proc.returncode == 0
    # the readers really ran during the commits
    assert counts["exports"] >= rounds and counts["summaries"] >= rounds, counts
    assert p["counts"]["exports"] >= rounds // 2, p["counts"]
    # the session is whole: every round, every mark, and the newest export recorded
    final = Session.open(sdir)
    assert final.round == rounds and final.marks_used == 4 * rounds
    assert len(final.history) == rounds
    assert all(final.marks_for(k) is not None for k in range(rounds))
    newest = max(exports + p["exports"], key=lambda e: e["time"])
    assert final.info["last_export"] == newest
    assert sorted(d.name for d in sdir.glob("state-*")) == [f"state-{rounds - 1:04d}",
                                                            f"state-{rounds:04d}"]
    assert not list(sdir.rglob("*.tmp")) and not list(sdir.glob(".state-*"))
    # every exported file holds exactly the LoRA its name says (the state of that round)
    from safetensors.torch import load_file
    files = sorted(out.glob("*.safetensors"))
    assert len(files) >= 2
    for f in files:
        r = int(f.stem.rsplit("_r", 1)[1])
        assert lora_digest(load_file(str(f))) == digests[r], f.name
    print(f"\nconcurrency: {rounds} commits, {counts['exports']} + {p['counts']['exports']} "
          f"exports, {counts['summaries']} + {p['counts']['summaries']} summaries, "
          f"{counts['lora_reads']} LoRA reads, 0 failures")


def _committed(tmp_path, name="s", rounds=2):
    torch.set_num_threads(1)  # bit-stable reductions: repaired rounds retrain identically
    s = Session.create(tmp_path / name, tiny_config())
    be, ev = tiny_backend(), evaluator()

    def query(b):
        m, sc = ev.query(b.images, be.prompts, None if s.best is None else s.best.score)
        return m, (float(sc[m.best]) if m.best is not None else None)
    for _ in range(rounds):
        loop.run_round(s, be, query)
    return s, be, query


def test_stale_writer_keeps_the_pointer(tmp_path):
    """The defect of issue 12: a Session copy opened before a commit wrote session.json from its
    old view. Now every write is a read-modify-write of only its own change."""
    s, be, query = _committed(tmp_path, rounds=1)
    stale = Session.open(s.path)        # e.g. the panel export, opened before the commit
    loop.run_round(s, be, query)
    assert s.round == 2 and stale.round == 1
    stale.update_info(last_export={"file": "x.safetensors", "round": 1})
    stale.record_export("y.safetensors")
    again = Session.open(s.path)
    assert again.round == 2 and again.state_dir.name == "state-0002"
    assert again.info["last_export"]["file"] == "y.safetensors"
    assert again.info["last_export"]["round"] == 2     # the round it really exported
    assert again.load_state()["lora"].keys() == s.load_state()["lora"].keys()
    # a stale commit of a round another process already committed is refused, nothing moves
    with pytest.raises(SessionError, match="round 2 is in progress"):
        stale.complete_round(1, {"lora": {}}, {}, None, 4)
    assert Session.open(s.path).state_dir.name == "state-0002"
    assert sorted(d.name for d in s.path.glob("state-*")) == ["state-0001", "state-0002"]


def test_lock_excludes_other_processes(tmp_path):
    """The session lock holds against another process (flock), and is re-entrant here."""
    d = tmp_path / "l"
    d.mkdir()
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from hero_engine.locks import FolderLock\n"
            "l = FolderLock(%r)\n"
            "print(l.acquire(blocking=False), flush=True)\n" % (str(REPO), str(d)))
    lock = FolderLock(d)
    with lock:
        with lock:  # re-entrant in this thread
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=60)
            assert out.stdout.strip() == "False", out.stderr
        got = []
        t = threading.Thread(target=lambda: got.append(FolderLock(d).acquire(blocking=False)))
        t.start()
        t.join()
        assert got == [False]  # another thread of this process waits too
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_leftovers_of_a_kill_are_cleaned_on_open(tmp_path):
    s, _, _ = _committed(tmp_path, rounds=2)
    p = s.path
    # what SIGKILLs leave: a marks temp file, an image temp file, a commit's temp folder, a state
    # folder written but never pointed at, and the remains of an interrupted delete
    (p / "rounds" / "0001" / ".marks.json.abc123.tmp").write_text('{"good": [')
    (p / "rounds" / "0001" / "images" / ".003.png.x.tmp").write_bytes(b"\x89PNG")
    (p / ".state-0003.k1.tmp").mkdir()
    (p / ".state-0003.k1.tmp" / "lora.pt").write_bytes(b"x" * 1000)
    shutil.copytree(p / "state-0002", p / "state-0003")
    (p / "state-0000").mkdir()
    # a temp file being written right now by a live writer is not touched
    live = p / "rounds" / "0001" / ".meta.json.live.tmp"
    fd = os.open(live, os.O_RDWR | os.O_CREAT)
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        Session.open(p, cleanup=False)  # the panel's read-only views clean nothing
        assert (p / "state-0003").exists()
        s2 = Session.open(p)
        assert live.exists()
    finally:
        os.close(fd)
    assert s2.round == 2
    assert sorted(d.name for d in p.glob("state-*")) == ["state-0001", "state-0002"]
    assert not list(p.glob(".state-*"))
    assert sorted(x.name for x in p.rglob("*.tmp")) == [".meta.json.live.tmp"]
    Session.open(p)
    assert not list(p.rglob("*.tmp"))  # unlocked now: a leftover
    # a commit in progress (its lock held) keeps its temp folder
    (p / ".state-0003.busy.tmp").mkdir()
    with FolderLock(p, ".commit.lock"):
        done = []
        t = threading.Thread(target=lambda: done.append(Session.open(p)))
        t.start()
        t.join(30)
        assert done and (p / ".state-0003.busy.tmp").exists()
    Session.open(p)
    assert not (p / ".state-0003.busy.tmp").exists()


def test_repair_deleted_state_folder(tmp_path):
    """A state folder deleted by hand: opening names it and the state repair goes back to; the
    repair returns to the previous round's state and the round is trained again from its marks,
    with the same result as before."""
    s, be, _ = _committed(tmp_path, rounds=3)
    want = s.load_state()["lora"]
    marks2 = s.marks_for(2)
    shutil.rmtree(s.path / "state-0003")
    with pytest.raises(SessionDamaged, match=r"state-0003 named in .*session\.json is missing.*"
                                             r"last complete state is state-0002 \(after round 1\)"
                                             r".*python -m hero_engine repair"):
        Session.open(s.path)
    rep = repair(s.path, apply=False)  # the offer, nothing changed yet
    assert rep["round"] == 2 and any("state-0002" in a for a in rep["actions"])
    with pytest.raises(SessionDamaged):
        Session.open(s.path)
    out = subprocess.run([sys.executable, "-m", "hero_engine", "repair", str(s.path)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert "go back to state-0002" in out.stdout and "round 2 in progress" in out.stdout
    r = Session.open(s.path)
    assert r.round == 2 and r.marks_used == 12 and len(r.history) == 2
    assert r.marks_for(2) == marks2  # nothing marked is lost
    # round 2 trains again from its saved marks: the same LoRA as before the damage
    train_again(r)
    got = Session.open(s.path).load_state()["lora"]
    assert r.round == 3
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-5), k


def test_repair_truncated_state_file_and_session_json(tmp_path):
    s, _, _ = _committed(tmp_path, rounds=2)
    enc = s.path / "state-0002" / "encoder.pt"
    enc.write_bytes(enc.read_bytes()[:1000])
    with pytest.raises(SessionDamaged, match=r"encoder\.pt is truncated"):
        Session.open(s.path)
    rep = repair(s.path)
    assert rep["round"] == 1 and any("encoder.pt" in p for p in rep["problems"])
    r = Session.open(s.path)
    assert r.round == 1 and r.marks_for(1) is not None and r.state_dir.name == "state-0001"
    assert not (s.path / "state-0002").exists()  # the damaged folder is gone
    # a truncated session.json: rebuilt from the newest complete state's manifest
    sj = s.path / "session.json"
    sj.write_text(sj.read_text()[:40])
    with pytest.raises(SessionDamaged, match=r"session\.json is damaged.*rebuilds session\.json "
                                             r"from state-0001"):
        Session.open(s.path)
    assert repair(s.path)["round"] == 1
    r = Session.open(s.path)
    assert r.round == 1 and r.marks_used == 6 and r.marks_for(0) is not None
    # before the first commit: rebuilt from session.init.json
    t = Session.create(tmp_path / "young", tiny_config())
    (t.path / "session.json").unlink()
    with pytest.raises(SessionDamaged, match="session.init.json"):
        Session.open(t.path)
    repair(t.path)
    assert Session.open(t.path).round == 0
    # nothing left to rebuild from: a clear error, nothing deleted
    (t.path / "session.json").unlink()
    (t.path / "session.init.json").unlink()
    with pytest.raises(RepairError, match="start a new session"):
        repair(t.path)


def test_repair_without_any_complete_state_archives_untrainable_rounds(tmp_path):
    s, _, _ = _committed(tmp_path, rounds=3)
    shutil.rmtree(s.path / "state-0003")
    shutil.rmtree(s.path / "state-0002")
    with pytest.raises(SessionDamaged, match="restarts learning at round 0"):
        Session.open(s.path)
    rep = repair(s.path)
    assert rep["round"] == 0
    r = Session.open(s.path)
    assert r.round == 0 and r.marks_used == 0 and r.state_dir is None
    # rounds 0 and 1 lost their trajectories (they were trained long ago): archived, marks kept
    arch = list((s.path / "rounds-archive").glob("*/0000/marks.json"))
    assert len(arch) == 1 and Marks.from_json(json.loads(arch[0].read_text()))
    assert not (s.path / "rounds" / "0000").exists()


def test_repair_of_a_sound_session_changes_nothing(tmp_path):
    s, _, _ = _committed(tmp_path, rounds=1)
    before = (s.path / "session.json").read_text()
    rep = repair(s.path)
    assert rep["problems"] == [] and rep["actions"] == [] and not rep["changed"]
    assert (s.path / "session.json").read_text() == before


# ---- kills and a full disk ------------------------------------------------------------------------

def _kill_at(tmp_path, sdir, mode, want):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    flag = sdir.parent / "FLAG"
    flag.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, str(HERE / "_kill_worker.py"), str(sdir), mode], env=env)
    t0 = time.time()
    while not (flag.exists() and flag.read_text() == want):
        assert p.poll() is None, f"worker ended before {want}"
        assert time.time() - t0 < 300
        time.sleep(0.02)
    p.kill()
    p.wait()


def test_kill_right_after_marks_are_saved(tmp_path):
    s, _, _ = _committed(tmp_path, rounds=1)
    _kill_at(tmp_path, s.path, "after-marks", "SAVED")
    r = Session.open(s.path)
    assert r.round == 1 and r.marks_for(1) is not None and r.pending() is not None


def test_kill_during_commit_then_resume(tmp_path):
    s, be, query = _committed(tmp_path, rounds=1)
    _kill_at(tmp_path, s.path, "in-commit", "COMMITTING")
    tmp_states = list(s.path.glob(".state-0002.*.tmp"))
    assert len(tmp_states) == 1 and len(list(tmp_states[0].glob("*.pt"))) == 2
    r = Session.open(s.path)  # the kill released the commit lock; leftovers go
    assert r.round == 1 and r.marks_for(1) is not None
    assert not list(s.path.glob(".state-*")) and not list(s.path.rglob("*.tmp"))
    train_again(r)
    assert Session.open(s.path).round == 2


def test_kill_during_export_releases_the_lock(tmp_path):
    s, _, _ = _committed(tmp_path, rounds=1)
    before = Session.open(s.path).info.get("last_export")
    _kill_at(tmp_path, s.path, "in-export", "EXPORTING")
    lock = FolderLock(s.path)
    assert lock.acquire(blocking=False), "a killed holder must not leave the session locked"
    lock.release()
    r = Session.open(s.path)
    assert r.info.get("last_export") == before  # the killed export was never recorded
    rec = r.record_export("after.bin")
    assert Session.open(s.path).info["last_export"] == rec


def test_disk_full_during_generation_and_training(tmp_path, monkeypatch):
    """ENOSPC in the middle of a round's writes: the call fails with the OS error, nothing half
    written is published, and the round goes through once space is back."""
    import errno
    from hero_engine import fileio
    s, be, query = _committed(tmp_path, rounds=1)
    real = fileio._write
    budget = {"left": 0}

    def full(fd, data):
        if budget["left"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        budget["left"] -= len(data)
        return real(fd, data)
    monkeypatch.setattr(fileio, "_write", full)
    # generation: the 3rd image cannot be written
    budget["left"] = 5000
    with pytest.raises(OSError, match="No space left"):
        loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                            be.latent_shape, be.prompts)
    r = Session.open(s.path)
    assert r.round == 1 and r.pending() is None  # no meta.json: the round is not half-generated
    assert not list(s.path.rglob("*.tmp"))
    budget["left"] = 10 ** 12
    batch = loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                                be.latent_shape, be.prompts)
    s.record_marks(1, query(batch)[0])
    # training: the disk fills while the state is committed
    plan = loop.prepare_learning(s)
    popt = be.policy_optimizer(s)
    loop.apply_policy_update(s, plan, be.denoiser(), popt)
    budget["left"] = 200_000
    with pytest.raises(OSError, match="No space left"):
        loop.complete_round(s, plan, be.lora_tensors(), popt)
    r = Session.open(s.path)
    assert r.round == 1 and r.state_dir.name == "state-0001" and r.marks_for(1) is not None
    assert not list(s.path.glob(".state-*")) and not list(s.path.rglob("*.tmp"))
    budget["left"] = 10 ** 12
    loop.complete_round(s, plan, be.lora_tensors(), popt)
    assert Session.open(s.path).round == 2
