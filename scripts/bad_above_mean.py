"""How often a reward ranks a marked-bad image above the batch mean (a positive advantage), on
round 0 of the base toy model, for hero-paper's similarity reward and hero's mark-anchored reward.

    PYTHONPATH=. .venv/bin/python scripts/bad_above_mean.py [OUT_JSON]

Prints one line per task (seeds 0-3) and writes the numbers to OUT_JSON (docs/benchmarks.md).
"""
import sys
import torch, shutil, json
torch.set_num_threads(1)
from hero_engine import loop
from hero_engine.harness.experiment import ExperimentSpec, toy_backend, toy_config
from hero_engine.harness.evaluator import SimulatedEvaluator
from hero_engine.session import Session
from hero_engine.harness.bench import BENCH_ENCODER_EPOCHS, BENCH_ENCODER_LR
out = {}
for task_name in ("colour", "count", "spatial", "removal"):
    for method in ("hero-paper", "hero"):
        for seed in (0, 1, 2, 3):
            spec = ExperimentSpec(task=task_name, method=method, rounds=1, steps=6, seed=seed,
                                  encoder_epochs=BENCH_ENCODER_EPOCHS, encoder_lr=BENCH_ENCODER_LR)
            toy, task, be = toy_backend(spec)
            shutil.rmtree(f"/tmp/hero_bad_above_{task_name}", ignore_errors=True)
            s = Session.create(f"/tmp/hero_bad_above_{task_name}", toy_config(spec, 6, be.guidance_scale))
            ev = SimulatedEvaluator(task.score, task.threshold)
            b = loop.generate_round(s, be.denoiser(), be.decode, be.schedule(6), be.latent_shape, be.prompts)
            m, _ = ev.query(b.images, be.prompts, None)
            s.record_marks(0, m)
            plan = loop.prepare_learning(s)
            out.setdefault(task_name, {}).setdefault(method, []).append(plan.metrics["bad_above_mean"])
    print(task_name, {k: [round(x, 2) for x in v] for k, v in out[task_name].items()}, flush=True)
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "bad_above_mean.json", "w"), indent=1)
