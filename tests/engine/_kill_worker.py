"""Subprocess for the kill tests (test_store.py): do one thing on a tiny session and get SIGKILLed
in the middle of it. A flag file says when the moment has come.

usage: python _kill_worker.py SESSION_DIR MODE
  after-marks   round 1: generate, save the marks, say SAVED, then wait (killed right after the
                save the marks API acknowledges with a 200)
  in-commit     round 1: train; the commit's state files are written slowly (killed mid-commit,
                with the commit lock and a temp state folder)
  in-export     export under the session lock, writing slowly (killed holding the session lock)
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import evaluator, tiny_backend  # noqa: E402

from hero_engine import loop, session as session_mod  # noqa: E402
from hero_engine.session import Session  # noqa: E402

torch.set_num_threads(1)
path, mode = Path(sys.argv[1]), sys.argv[2]
flag = path.parent / "FLAG"
s = Session.open(path)
be = tiny_backend()
be.load_session(s)
ev = evaluator()
if mode == "after-marks":
    b = loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                            be.latent_shape, be.prompts)
    s.record_marks(b.round, ev.query(b.images, be.prompts, 1.0)[0])
    flag.write_text("SAVED")
    time.sleep(600)
elif mode == "in-commit":
    b = loop.generate_round(s, be.denoiser(), be.decode, be.schedule(s.config.steps),
                            be.latent_shape, be.prompts)
    s.record_marks(b.round, ev.query(b.images, be.prompts, 1.0)[0])
    plan = loop.prepare_learning(s)
    popt = be.policy_optimizer(s)
    loop.apply_policy_update(s, plan, be.denoiser(), popt, conditional=be.denoiser(guidance_scale=1.0))
    real = session_mod.atomic_torch_save
    n = [0]

    def slow(p, obj):
        real(p, obj)
        n[0] += 1
        if n[0] == 2:  # two state files written into the temp folder
            flag.write_text("COMMITTING")
            time.sleep(600)
    session_mod.atomic_torch_save = slow
    loop.complete_round(s, plan, be.lora_tensors(), popt)
elif mode == "in-export":
    def write(st, s_):
        out = path.parent / "exp.bin"
        out.write_bytes(b"x" * 1000)
        flag.write_text("EXPORTING")
        time.sleep(600)
        return {"file": "exp.bin"}
    s.export_state(write)
raise SystemExit("should have been killed")
