"""``python -m hero_engine demo|bench|repair``: the HERO loop on the embedded toy model, and the
repair of a damaged session folder."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(argv: list[str]) -> int:
    from .experiment import (ExperimentSpec, add_runtime_args, apply_runtime_args,
                             run_experiment, toy_lr)
    from .plots import line_plot
    from ..session import METHOD_TRAITS
    from ..toy import TASKS
    ap = argparse.ArgumentParser(prog="python -m hero_engine demo",
                                 description="A whole HERO session on the embedded toy model, "
                                             "marked by a simulated evaluator.")
    ap.add_argument("--task", default="colour", choices=sorted(TASKS))
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of --batch-size marks (default 2: under 3 minutes on 2 CPU cores)")
    ap.add_argument("--budget", type=int, default=None,
                    help="feedback budget in marks (overrides --rounds: rounds = budget / batch)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=128,
                    help="fresh samples for the success before and after")
    ap.add_argument("--eval-every", type=int, default=1,
                    help="also measure success (on --eval-n-mid samples) every k rounds; 0 = never")
    ap.add_argument("--eval-n-mid", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the toy's)")
    ap.add_argument("--lr", type=float, default=None,
                    help="LoRA learning rate (default: the toy-scale rate of the method's update "
                         "rule, experiment.TOY_LR; the SD default is 1e-3)")
    ap.add_argument("--method", default="hero", choices=list(METHOD_TRAITS),
                    help="hero: our recipe (default); hero-paper: the paper's settings")
    ap.add_argument("--out", default="hero_out/demo", help="output folder")
    add_runtime_args(ap)
    a = ap.parse_args(argv)
    device = apply_runtime_args(a)
    if a.batch_size < 2:
        ap.error("--batch-size must be at least 2")
    rounds = a.rounds if a.budget is None else max(1, a.budget // a.batch_size)
    spec = ExperimentSpec(task=a.task, method=a.method, rounds=rounds, batch_size=a.batch_size,
                          seed=a.seed, eval_n=a.eval_n, eval_n_mid=a.eval_n_mid,
                          eval_every=a.eval_every, steps=a.steps,
                          lr=a.lr if a.lr is not None else toy_lr(a.method))
    out = Path(a.out)
    t0 = time.time()
    res = run_experiment(spec, out, device=device, export=True)
    pts = [p for p in res["curve"] if p["success"] is not None]
    line_plot({"success (fresh samples)": ([p["labels"] for p in pts], [p["success"] for p in pts]),
               "good rate (guided batches)": ([p["labels"] for p in res["curve"][1:]],
                                              [p["good_rate"] for p in res["curve"][1:]])},
              title=f"HERO on toy task '{a.task}'", xlabel="marks used", ylim=(0, 1)
              ).save(out / "success_vs_marks.png")
    print(f"outputs in {out}/: round_XX.png (marked batches), success_vs_marks.png, "
          f"{Path(res['lora']).name} (kohya LoRA); {time.time() - t0:.0f}s in all")
    print(f"success_before={res['success_before']:.3f} success_after={res['success_after']:.3f} "
          f"marks={res['marks']}")
    return 0


def repair(argv: list[str]) -> int:
    from ..repair import repair as do_repair
    from ..session import Session, SessionError
    ap = argparse.ArgumentParser(
        prog="python -m hero_engine repair",
        description="Check a HERO session folder and restore it to its last complete state "
                    "(docs/session_store.md). Marks are never deleted: rounds that cannot be "
                    "trained again are moved to rounds-archive/.")
    ap.add_argument("session_dir", help="the session folder, e.g. ComfyUI/output/hero/<id>")
    ap.add_argument("--dry-run", action="store_true", help="only say what would be done")
    a = ap.parse_args(argv)
    try:
        rep = do_repair(Path(a.session_dir), apply=not a.dry_run)
    except SessionError as e:
        print(f"repair failed: {e}", file=sys.stderr)
        return 1
    for p in rep["problems"]:
        print(f"problem: {p}")
    for x in rep["actions"]:
        print(("would " if a.dry_run else "done: ") + x)
    if not rep["problems"] and not rep["actions"]:
        print("nothing to repair: the session is sound")
    if not a.dry_run:
        try:
            s = Session.open(Path(a.session_dir))
        except SessionError as e:
            print(f"the session still does not open: {e}", file=sys.stderr)
            return 1
        print(f"session {s.session_id}: round {s.round} in progress, {s.marks_used} labels used")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m hero_engine demo|bench|repair [options]   (--help after a command)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return demo(rest)
    if cmd == "repair":
        return repair(rest)
    if cmd == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    print(f"unknown command {cmd!r}; use demo, bench or repair", file=sys.stderr)
    return 2
