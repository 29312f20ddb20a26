"""``python -m hero_engine bench``: feedback efficiency on the toy domain, HERO against baselines.

For every (task, method, seed) a simulated session runs with a fixed mark budget; after every round
success is measured on fresh N(0, I) samples (fixed evaluation seeds, the same for every method).
Writes ``bench.json`` (every measurement), ``bench.md`` (the table) and ``bench_<task>.png``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Optional

from .experiment import ExperimentSpec, run_experiment

METHODS = ["hero", "hero-no-guidance", "ddpo-binary", "d3po"]
ENCODER_METHODS = ("hero", "hero-no-guidance")
# Bench scale. 6 DDIM steps (eta 1, cfg 3) keep the toy's samples clean and every task's base
# success inside 5-40% (count 30%, colour 25%, spatial 23%, removal 27% on 256 samples) at under a
# third of the demo's 20-step cost.
BENCH_STEPS = 6
BENCH_PPO_TIMESTEPS = 1      # 1 of 6 steps per chain, the nearest to HERO's 5 of 50
BENCH_PPO_BATCH = 8          # the official 8 samples per AdamW step, in one backward pass
# The encoder at the official lr 1e-5 leaves the round-0 triplet loss at 0.48 after 100 steps
# (0.04 after 200); at 1e-4 it reaches 0 within 100 steps in every round.
BENCH_ENCODER_EPOCHS = 100
BENCH_ENCODER_LR = 1e-4
# D3PO's authors train at 3e-5 where ddpo-pytorch trains at 3e-4; the toy's DDPO lr is 1e-2, so
# D3PO gets 1e-3. (Measured on `colour`, 2 seeds, 256 marks: 3e-4 left success flat at 0.22-0.23;
# 3e-3 collapsed one seed to 0.09.)
BENCH_D3PO_LR = 1e-3
MILESTONES = (128, 256, 512)
TARGETS = (0.5, 0.8)


def load_evaluator(spec: str):
    """``module:function`` -> f(images [B,3,H,W] in [0,1], prompts) -> scores [B]."""
    if ":" not in spec:
        raise SystemExit(f"--evaluator must be module:function, got {spec!r}")
    mod, fn = spec.split(":", 1)
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"cannot load evaluator {spec!r}: {e}")
    if not callable(f):
        raise SystemExit(f"evaluator {spec!r} is not callable")
    return f


def success_at(curve: list[dict], marks: int) -> Optional[float]:
    """Success measured at the last evaluation with at most ``marks`` labels (None when the
    session's budget stopped short of ``marks``)."""
    if max(p["labels"] for p in curve) < marks:
        return None
    pts = [p for p in curve if p["success"] is not None and p["labels"] <= marks]
    return pts[-1]["success"] if pts else None


def marks_to_reach(curve: list[dict], target: float) -> Optional[int]:
    for p in curve:
        if p["success"] is not None and p["success"] >= target:
            return p["labels"]
    return None


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _median_marks(vals):
    """Median of marks-needed over seeds; a seed that never reached counts as infinity."""
    vals = sorted(float("inf") if v is None else v for v in vals)
    if not vals:
        return None
    return statistics.median(vals)  # inf = the median seed never reached it


def summarise(results: list[dict]) -> dict:
    table = {}
    for r in results:
        table.setdefault(r["task"], {}).setdefault(r["method"], []).append(r)
    summary = {}
    for task, by_m in table.items():
        summary[task] = {}
        for method, runs in by_m.items():
            n = len(runs)
            row = {"seeds": n,
                   "base": _median([r["success_before"] for r in runs]),
                   "final": _median([r["success_after"] for r in runs]),
                   "marks": max(r["marks"] for r in runs),
                   "diversity_after": _median([r["diversity_after"] for r in runs]),
                   "diversity_before": _median([r["diversity_before"] for r in runs])}
            for m in MILESTONES:
                row[f"success@{m}"] = _median([success_at(r["curve"], m) for r in runs])
            for t in TARGETS:
                row[f"marks_to_{int(t * 100)}"] = _median_marks(
                    [marks_to_reach(r["curve"], t) for r in runs])
            summary[task][method] = row
        hero = summary[task].get("hero")
        for method, row in summary[task].items():
            for t in TARGETS:
                k = f"marks_to_{int(t * 100)}"
                h = hero[k] if hero else None
                if h is None or h == float("inf") or row[k] is None:
                    row[f"ratio_{int(t * 100)}"] = None   # hero never reached it: no ratio
                else:
                    row[f"ratio_{int(t * 100)}"] = row[k] / h  # inf = this method never did
    return summary


def _fmt(v, pct=False):
    if v is None:
        return "—"
    if v == float("inf"):
        return "never"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"Median over {meta['seeds']} seed(s); success on {meta['eval_n']} fresh N(0, I) "
             f"samples per point; {meta['batch_size']} marks per round, budget "
             f"{meta['budget']} marks. 'never' = not reached within the budget. ×hero = the "
             f"marks this method needed / the marks hero needed (4 or more: hero needed a quarter "
             f"or less)."
             + (f" The simulated person marks each image wrongly with probability "
                f"{meta['flip_rate']:g}." if meta.get("flip_rate") else ""), ""]
    head = ("| task | method | base | success@128 | @256 | @512 | final | marks to 50% | "
            "marks to 80% | ×hero (50%) | ×hero (80%) | diversity (before→after) |")
    lines += [head, "|" + "---|" * 12]
    for task, rows in summary.items():
        for method, r in rows.items():
            lines.append(
                f"| {task} | {method} | {_fmt(r['base'], 1)} | {_fmt(r['success@128'], 1)} | "
                f"{_fmt(r['success@256'], 1)} | {_fmt(r['success@512'], 1)} | "
                f"{_fmt(r['final'], 1)} | {_fmt(r['marks_to_50'])} | {_fmt(r['marks_to_80'])} | "
                f"{_fmt(r['ratio_50'])} | {_fmt(r['ratio_80'])} | "
                f"{r['diversity_before']:.3f}→{r['diversity_after']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    from .plots import line_plot
    paths = []
    for task in sorted({r["task"] for r in results}):
        series = {}
        for method in METHODS:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            labels = sorted({p["labels"] for r in runs for p in r["curve"] if p["success"] is not None})
            ys = [_median([next((p["success"] for p in r["curve"] if p["labels"] == x
                                 and p["success"] is not None), None) for r in runs])
                  for x in labels]
            series[method] = (labels, ys)
        p = out / f"bench_{task}.png"
        line_plot(series, title=f"toy task '{task}': success on fresh samples",
                  xlabel="marks used", ylim=(0, 1), hlines={"80%": 0.8},
                  colours={m: i for i, m in enumerate(METHODS)}).save(p)
        paths.append(p)
    return paths


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _run_one(spec: ExperimentSpec, runs_dir: Path, device: str, keep_sessions: bool = True
             ) -> dict:
    res = run_experiment(spec, runs_dir, device=device, save_grids=False)
    if not keep_sessions:   # a session keeps every round's chain: about 65 MB at batch 64
        shutil.rmtree(res["session"], ignore_errors=True)
        res["session"] = None
    return res


def run_all(specs: list[ExperimentSpec], runs_dir: Path, device: str, workers: int,
            threads: Optional[int] = None, keep_sessions: bool = True) -> list[dict]:
    """Run every session, ``workers`` at a time in separate processes (small torch ops scale
    badly over threads: two one-thread processes beat one two-thread process by about 1.2x on
    2 cores). Results come back in the order of ``specs``."""
    if workers <= 1:
        return [_run_one(s, runs_dir, device, keep_sessions) for s in specs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    per = threads or max(1, (os.cpu_count() or 1) // workers)
    # the longest sessions first, so the last worker does not idle at the end
    order = sorted(range(len(specs)), key=lambda i: specs[i].method not in ENCODER_METHODS)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(per,)) as pool:
        futs = {i: pool.submit(_run_one, specs[i], runs_dir, device, keep_sessions)
                for i in order}
        return [futs[i].result() for i in range(len(specs))]


def main(argv: list[str]) -> int:
    from .cli import add_runtime_args, apply_runtime_args
    from .toy import TASKS
    ap = argparse.ArgumentParser(prog="python -m hero_engine bench", description=__doc__)
    ap.add_argument("--tasks", default=",".join(sorted(TASKS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=512, help="marks per session")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-n", type=int, default=128)
    ap.add_argument("--steps", type=int, default=BENCH_STEPS,
                    help=f"DDIM steps for training and evaluation (default {BENCH_STEPS})")
    ap.add_argument("--ppo-timesteps", type=int, default=BENCH_PPO_TIMESTEPS,
                    help="timesteps trained per sample by PPO / D3PO "
                         f"(default {BENCH_PPO_TIMESTEPS})")
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="LoRA learning rate of the DDPO methods (toy scale)")
    ap.add_argument("--d3po-lr", type=float, default=BENCH_D3PO_LR,
                    help=f"LoRA learning rate of d3po (default {BENCH_D3PO_LR})")
    ap.add_argument("--encoder-epochs", type=int, default=BENCH_ENCODER_EPOCHS,
                    help=f"triplet-loss steps per round (default {BENCH_ENCODER_EPOCHS})")
    ap.add_argument("--workers", type=int, default=None,
                    help="sessions run in parallel, one process each (default: one per CPU core "
                         "on CPU, with one thread each; 1 on a GPU)")
    ap.add_argument("--keep-sessions", action="store_true",
                    help="keep each session folder (every round's images and chains, about 65 MB "
                         "a session); by default only the per-session result JSONs stay")
    ap.add_argument("--quick", action="store_true",
                    help="one task, hero vs ddpo-binary, one seed, 256 marks")
    ap.add_argument("--evaluator", default=None, help="module:function scoring images")
    ap.add_argument("--threshold", type=float, default=None, help="score >= threshold is good")
    ap.add_argument("--prompt", default=None, help="prompt for a custom evaluator")
    ap.add_argument("--fresh-ratio", type=float, default=0.0,
                    help="hero only, not in HERO: share of each guided batch kept at N(0, I)")
    ap.add_argument("--flip-rate", type=float, default=0.0,
                    help="chance that the simulated person marks an image wrongly (0-0.5); "
                         "success is still measured with the true scores")
    ap.add_argument("--out", default="hero_out/bench")
    ap.add_argument("--report", default=None, metavar="BENCH_JSON",
                    help="run nothing: write the table and plots of an earlier bench.json to --out")
    add_runtime_args(ap)
    a = ap.parse_args(argv)
    if a.report:
        return report(Path(a.report), Path(a.out))
    device = apply_runtime_args(a)
    if not 0 <= a.flip_rate <= 0.5:
        ap.error(f"--flip-rate must be in [0, 0.5], got {a.flip_rate}")
    if not 0 <= a.fresh_ratio < 1:
        ap.error(f"--fresh-ratio must be in [0, 1), got {a.fresh_ratio}")
    if a.quick:
        a.tasks, a.methods, a.seeds, a.budget = "colour", "hero,ddpo-binary", "0", 256
    tasks = [t for t in a.tasks.split(",") if t]
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {METHODS}")
    score_fn = None
    if a.evaluator:
        score_fn = load_evaluator(a.evaluator)
        if a.threshold is None or a.prompt is None:
            ap.error("--evaluator needs --threshold and --prompt")
        tasks = ["custom"]
    else:
        for t in tasks:
            if t not in TASKS:
                ap.error(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    rounds = max(1, a.budget // a.batch_size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [ExperimentSpec(task=task, method=method, rounds=rounds, batch_size=a.batch_size,
                            seed=seed, eval_n=a.eval_n, steps=a.steps,
                            lr=a.d3po_lr if method == "d3po" else a.lr,
                            ppo_timesteps=a.ppo_timesteps, ppo_batch=BENCH_PPO_BATCH,
                            encoder_epochs=a.encoder_epochs, encoder_lr=BENCH_ENCODER_LR,
                            score_fn=score_fn, threshold=a.threshold, prompt=a.prompt,
                            flip_rate=a.flip_rate,
                            hero={"fresh_ratio": a.fresh_ratio} if a.fresh_ratio else {})
             for task in tasks for seed in seeds for method in methods]
    workers = a.workers or (1 if device != "cpu" else min(len(specs), os.cpu_count() or 1))
    t0 = time.time()
    results = run_all(specs, out / "runs", device, workers, a.threads, a.keep_sessions)
    meta = {"seeds": len(seeds), "eval_n": a.eval_n, "batch_size": a.batch_size,
            "budget": rounds * a.batch_size, "steps": a.steps, "ppo_timesteps": a.ppo_timesteps,
            "encoder_epochs": a.encoder_epochs, "flip_rate": a.flip_rate,
            "fresh_ratio": a.fresh_ratio,
            "lr": a.lr, "d3po_lr": a.d3po_lr, "encoder_lr": BENCH_ENCODER_LR, "device": device,
            "workers": workers, "seconds": time.time() - t0,
            "argv": argv}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "summary": summarise(results),
                                                "runs": results}, indent=1))
    _write_report(results, meta, out)
    print(f"wrote {out / 'bench.json'} in {time.time() - t0:.0f}s")
    return 0


def _write_report(results: list[dict], meta: dict, out: Path) -> None:
    md = markdown(summarise(results), meta)
    (out / "bench.md").write_text(md)
    plots = plot(results, out)
    print(md)
    print(f"wrote {out / 'bench.md'}, {', '.join(str(p) for p in plots)}")


def report(bench_json: Path, out: Path) -> int:
    """Table and plots again from an earlier run's bench.json (nothing is run)."""
    try:
        data = json.loads(bench_json.read_text())
        results, meta = data["runs"], data["meta"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--report needs a bench.json written by this command: {e}")
    out.mkdir(parents=True, exist_ok=True)
    _write_report(results, meta, out)
    return 0
