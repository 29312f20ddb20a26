"""Subprocess for the kill-and-resume test: run rounds on the tiny backend.

usage: python _round_worker.py SESSION_DIR MODE   (MODE: full | kill-in-training)
In kill-in-training mode the policy update is slowed down and a flag file announces it, so the
parent can SIGKILL the process in the middle of training.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import evaluator, tiny_backend, tiny_config  # noqa: E402

from hero_engine import loop  # noqa: E402
from hero_engine.session import Session  # noqa: E402

torch.set_num_threads(1)
path, mode = Path(sys.argv[1]), sys.argv[2]
session = Session.open_or_create(path, tiny_config())
be = tiny_backend()
be.load_session(session)
ev = evaluator()

# round 0 completes normally
loop.run_round(session, be, lambda b: ev.query(b.images, be.prompts, None)[0:1] + (None,))
# round 1: generate, mark, then train
batch = loop.generate_round(session, be.denoiser(), be.decode, be.schedule(session.config.steps),
                            be.latent_shape, be.prompts)
marks, _ = ev.query(batch.images, be.prompts, 1.0)
session.record_marks(batch.round, marks)
plan = loop.prepare_learning(session)
popt = be.policy_optimizer(session)
den, cond = be.denoiser(), be.denoiser(guidance_scale=1.0)   # the guided and the conditional prediction
if mode == "kill-in-training":
    def slow(f):
        def g(*a, **k):
            (path / "TRAINING").write_text("now")
            time.sleep(0.2)
            return f(*a, **k)
        return g
    loop.apply_policy_update(session, plan, slow(den), popt, conditional=slow(cond))
    raise SystemExit("should have been killed")
loop.apply_policy_update(session, plan, den, popt, conditional=cond)
loop.complete_round(session, plan, be.lora_tensors(), popt)
print("done")
