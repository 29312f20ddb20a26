"""``python -m hero_engine bench``: feedback efficiency on the toy domain, HERO against baselines.

For every (task, method, seed) a simulated session runs with a fixed mark budget; after every round
success is measured on fresh N(0, I) samples (fixed evaluation seeds, the same for every method).
Writes ``bench.json`` (every measurement), ``bench.md`` (the table) and ``bench_<task>.png``.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Optional

from .experiment import (TOY_LR, ExperimentSpec, add_runtime_args, apply_runtime_args,
                         run_experiment)
from ..session import METHOD_TRAITS

METHODS = list(METHOD_TRAITS)     # what a method does is its traits, never its name
DEFAULT_METHODS = ["hero", "hero-paper", "ddpo-binary", "d3po"]
# The methods' roles in the report:
REFERENCE = "hero"               # paired differences and marks ratios are to it; drawn on top
AUC_BASELINE = "ddpo-binary"     # the target: the reference's AUC at least this one's
RATIO_TARGETS = (("ddpo-binary", 2), ("d3po", 4))   # to 80%: at most 1/x of their marks
# Bench scale: each setting and why it was chosen, with the measurements, in docs/benchmarks.md
# ("Bench scale").
BENCH_STEPS = 6
BENCH_PPO_TIMESTEPS = 1      # 1 of 6 steps per chain, the nearest to HERO's 5 of 50
BENCH_PPO_BATCH = 8          # the official 8 samples per AdamW step, in one backward pass
BENCH_ENCODER_EPOCHS = 100
BENCH_ENCODER_LR = 1e-4
BENCH_D3PO_LR = TOY_LR["d3po"]
BENCH_RWR_LR = TOY_LR["rwr"]
MILESTONES = (128, 256, 512)
TARGETS = (0.5, 0.8)
BOOTSTRAP = 2000
BENCH_EVAL_N = 64      # fresh samples per evaluation
SUCCESS_KINDS = ("success", "session_success")   # fresh noise; the session's own (guided) batch


def parse_method(text: str) -> tuple[str, dict]:
    """``hero`` or a variant ``hero+extra_ratio=0+reward=similarity`` -> (method, overrides)."""
    from ..session import METHOD_TRAITS, HeroConfig
    base, *parts = text.split("+")
    if base not in METHOD_TRAITS:
        raise ValueError(f"unknown method {base!r}; choose from {list(METHOD_TRAITS)}")
    from ..policy import PolicyConfig
    from ..representation import RepresentationConfig
    fields = {f for f in HeroConfig.__dataclass_fields__} - {"method", "policy", "representation"}
    fields |= {f"policy.{f}" for f in PolicyConfig.__dataclass_fields__}
    fields |= {f"representation.{f}" for f in RepresentationConfig.__dataclass_fields__}
    over = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"method variant {text!r}: write key=value after '+', got {part!r}")
        k, v = part.split("=", 1)
        if k not in fields:
            raise ValueError(f"method variant {text!r}: {k!r} is not a HERO setting; use one of "
                             f"{sorted(fields)}")
        low = v.lower()
        if low in ("true", "false"):
            val = low == "true"
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        over[k] = val
    HeroConfig(method=base, **{k: v for k, v in over.items() if "." not in k}).validate()
    return base, over


def person_name(flip_rate: float) -> str:
    return "exact" if not flip_rate else f"flips {100 * flip_rate:g}%"


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


def success_at(curve: list[dict], marks: int, key: str = "success") -> Optional[float]:
    """Success measured at the last evaluation with at most ``marks`` marks (None when the
    session's budget stopped short of ``marks``). A curve point's ``"labels"`` is the marks so
    far: the key keeps its old name, as stored bench results have it."""
    if max(p["labels"] for p in curve) < marks:
        return None
    pts = [p for p in curve if p.get(key) is not None and p["labels"] <= marks]
    return pts[-1][key] if pts else None


def marks_to_reach(curve: list[dict], target: float, key: str = "success") -> Optional[int]:
    for p in curve:
        if p.get(key) is not None and p[key] >= target:
            return p["labels"]
    return None


def area_under(curve: list[dict], budget: int, key: str = "success") -> Optional[float]:
    """Mean success over 0..budget marks: the trapezoid area under success-vs-marks / budget."""
    pts = [(p["labels"], p[key]) for p in curve if p.get(key) is not None and p["labels"] <= budget]
    if len(pts) < 2 or pts[-1][0] < budget:
        return None
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    return area / budget


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _median_marks(vals):
    """Median of marks-needed over seeds; a seed that never reached counts as infinity."""
    vals = sorted(float("inf") if v is None else v for v in vals)
    if not vals:
        return None
    return statistics.median(vals)  # inf = the median seed never reached it


def bootstrap_interval(vals: list, stat=statistics.median, level: float = 0.9,
                       n: int = BOOTSTRAP, seed: int = 0) -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of ``stat`` over the seeds (resampled with replacement)."""
    vals = [v for v in vals if v is not None]
    if len(vals) < 2:
        return None
    import random
    rng = random.Random(seed)
    stats = sorted(stat([rng.choice(vals) for _ in vals]) for _ in range(n))
    lo = stats[int((1 - level) / 2 * (n - 1))]
    hi = stats[int((1 + level) / 2 * (n - 1))]
    return lo, hi


def _inf(v):
    return float("inf") if v is None else v


def summarise(results: list[dict]) -> dict:
    """summary[person][task][method] -> medians, 90% intervals and paired differences vs hero."""
    table: dict = {}
    for r in results:
        person = person_name(r.get("flip_rate", 0.0))
        table.setdefault(person, {}).setdefault(r["task"], {}).setdefault(r["method"], []).append(r)
    summary: dict = {}
    for person, by_task in table.items():
        summary[person] = {}
        for task, by_m in by_task.items():
            rows = summary[person][task] = {}
            budget = min(max(r["marks"] for r in runs) for runs in by_m.values())
            for method, runs in by_m.items():
                row = {"seeds": len(runs), "budget": budget,
                       "base": _median([r["success_before"] for r in runs]),
                       "final": _median([r["success_after"] for r in runs]),
                       "marks": max(r["marks"] for r in runs),
                       "diversity_after": _median([r["diversity_after"] for r in runs]),
                       "diversity_before": _median([r["diversity_before"] for r in runs])}
                for key in SUCCESS_KINDS:
                    pre = "" if key == "success" else "session_"
                    aucs = [area_under(r["curve"], budget, key) for r in runs]
                    row[pre + "auc"] = _median(aucs)
                    row[pre + "auc_ci"] = bootstrap_interval(aucs)
                    row[pre + "final"] = _median([success_at(r["curve"], budget, key)
                                                  for r in runs])
                    for t in TARGETS:
                        k = f"{pre}marks_to_{int(t * 100)}"
                        need = [_inf(marks_to_reach(r["curve"], t, key)) for r in runs]
                        row[k] = _median_marks(need)
                        row[k + "_ci"] = bootstrap_interval(need)
                for m in MILESTONES:
                    row[f"success@{m}"] = _median([success_at(r["curve"], m) for r in runs])
                row["by_seed"] = {r["seed"]: r for r in runs}
                rows[method] = row
            hero = rows.get(REFERENCE)
            for method, row in rows.items():
                for key in SUCCESS_KINDS:
                    pre = "" if key == "success" else "session_"
                    diffs = []
                    if hero is not None:
                        for seed, r in row["by_seed"].items():
                            h = hero["by_seed"].get(seed)
                            a, b = (area_under(x["curve"], budget, key)
                                    for x in (r, h)) if h else (None, None)
                            if a is not None and b is not None:
                                diffs.append(a - b)
                    row[pre + "auc_vs_hero"] = _median(diffs)
                    row[pre + "auc_vs_hero_ci"] = bootstrap_interval(diffs)
                    row[pre + "auc_wins_vs_hero"] = (sum(d > 0 for d in diffs), len(diffs))
                for t in TARGETS:
                    k = f"marks_to_{int(t * 100)}"
                    h = hero[k] if hero else None
                    if h is None or h == float("inf") or row[k] is None:
                        row[f"ratio_{int(t * 100)}"] = None   # hero never reached it: no ratio
                    else:
                        row[f"ratio_{int(t * 100)}"] = row[k] / h  # inf = this method never did
            for row in rows.values():
                row.pop("by_seed")
    return summary


def verdict(summary: dict) -> list[str]:
    """The issue's target, checked per simulated person: hero reaches 80% on >= 3 tasks; its
    AUC >= ddpo-binary's on every task; to 80% it needs <= 1/2 of ddpo-binary's marks and <= 1/4
    of d3po's (or they never get there). A baseline that was not run fails its check."""
    lines = []
    for person, by_task in summary.items():
        ref, base = REFERENCE, AUC_BASELINE
        reached = [t for t, rows in by_task.items()
                   if rows.get(ref, {}).get("marks_to_80") not in (None, float("inf"))]
        auc_ok = [t for t, rows in by_task.items() if ref in rows and base in rows
                  and rows[ref]["auc"] is not None and rows[base]["auc"] is not None
                  and rows[ref]["auc"] >= rows[base]["auc"]]
        ratio_ok = []
        for t in reached:
            rows = by_task[t]
            ok = all(b in rows and (rows[b]["ratio_80"] or 0) >= need for b, need in RATIO_TARGETS)
            if ok:
                ratio_ok.append(t)
        lines.append(f"- {person}: {ref} reaches 80% on {len(reached)}/{len(by_task)} tasks "
                     f"({', '.join(sorted(reached)) or 'none'}); AUC >= {base} on "
                     f"{len(auc_ok)}/{len(by_task)} ({', '.join(sorted(auc_ok)) or 'none'}); "
                     f"marks-to-80% ratios met on {len(ratio_ok)}/{len(reached)} of those "
                     f"reached ({', '.join(sorted(ratio_ok)) or 'none'}).")
    return lines


def _fmt(v, pct=False):
    if v is None:
        return "—"
    if v == float("inf"):
        return "never"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def _ci(v, pct=False):
    if v is None:
        return ""
    return f" ({_fmt(v[0], pct)}–{_fmt(v[1], pct)})"


def _pp(v):
    return "—" if v is None else f"{100 * v:+.1f}"


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"Median over up to {meta['seeds']} seed(s) per row, paired by seed (same base, "
             f"same evaluation "
             f"noises); 90% bootstrap intervals in brackets. Fresh success on {meta['eval_n']} "
             f"fresh N(0, I) samples after every round (the LoRA alone, what an exported LoRA "
             f"gives); session success = the true success of the batch the person is shown "
             f"(the LoRA on the session's own, possibly guided, noise). AUC = mean success over "
             f"0–{meta['budget']} marks; ΔAUC = the paired difference to hero, in points. "
             f"'never' = not reached within the budget; ×hero = marks needed / hero's.", ""]
    head = ("| task | method | base | AUC fresh | ΔAUC vs hero | final fresh | marks to 50% | "
            "marks to 80% | ×hero (80%) | AUC session | final session | diversity |")
    for person, by_task in summary.items():
        lines += [f"**Simulated person: {person}**", "", head, "|" + "---|" * 12]
        for task, rows in by_task.items():
            for method, r in rows.items():
                lines.append(
                    f"| {task} | {method} | {_fmt(r['base'], 1)} | "
                    f"{_fmt(r['auc'], 1)}{_ci(r['auc_ci'], 1)} | "
                    f"{_pp(r['auc_vs_hero'])}"
                    f"{'' if r['auc_vs_hero_ci'] is None else ' (%s–%s)' % tuple(_pp(x) for x in r['auc_vs_hero_ci'])} | "
                    f"{_fmt(r['final'], 1)} | {_fmt(r['marks_to_50'])}{_ci(r['marks_to_50_ci'])} | "
                    f"{_fmt(r['marks_to_80'])}{_ci(r['marks_to_80_ci'])} | {_fmt(r['ratio_80'])} | "
                    f"{_fmt(r['session_auc'], 1)} | {_fmt(r['session_final'], 1)} | "
                    f"{r['diversity_before']:.3f}→{r['diversity_after']:.3f} |")
        lines.append("")
    lines += ["**Target check**", ""] + verdict(summary)
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    from .plots import line_plot
    paths = []
    names = list(dict.fromkeys(METHODS + [r["method"] for r in results]))
    for person in sorted({person_name(r.get("flip_rate", 0.0)) for r in results}):
        for task in sorted({r["task"] for r in results}):
            series = {}
            for method in sorted(names, key=lambda m: m == REFERENCE):   # drawn last, on top
                runs = [r for r in results if r["task"] == task and r["method"] == method
                        and person_name(r.get("flip_rate", 0.0)) == person]
                if not runs:
                    continue
                # a curve point's "labels": the marks so far (the stored results' key)
                marks = sorted({p["labels"] for r in runs for p in r["curve"]
                                if p["success"] is not None})
                ys = [_median([next((p["success"] for p in r["curve"] if p["labels"] == x
                                     and p["success"] is not None), None) for r in runs])
                      for x in marks]
                series[method] = (marks, ys)
            suffix = "" if person == "exact" else "_" + person.replace(" ", "").replace("%", "pc")
            p = out / f"bench_{task}{suffix}.png"
            line_plot(series, title=f"toy task '{task}' ({person}): median success on fresh "
                                    f"samples", xlabel="marks used", ylim=(0, 1),
                      hlines={"80%": 0.8}, colours={m: i for i, m in enumerate(names)}).save(p)
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


def _cost(spec: ExperimentSpec) -> float:
    """A rough relative cost of a session, to start the longest first."""
    from ..session import HeroConfig
    c = HeroConfig(method=spec.method, **{k: v for k, v in spec.hero.items() if "." not in k})
    return (1 + c.extra_ratio) * (1.3 if c.uses_encoder else 1.0)


def run_all(specs: list[ExperimentSpec], runs_dir: Path, device: str, workers: int,
            threads: Optional[int] = None, keep_sessions: bool = True) -> list[dict]:
    """Run every session, ``workers`` at a time in separate processes (small torch ops scale
    badly over threads: docs/benchmarks.md, "Run time of the full protocol"). Results come back in
    the order of ``specs``."""
    if workers <= 1:
        return [_run_one(s, runs_dir, device, keep_sessions) for s in specs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    per = threads or max(1, (os.cpu_count() or 1) // workers)
    # the longest sessions first, so the last worker does not idle at the end
    order = sorted(range(len(specs)), key=lambda i: -_cost(specs[i]))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(per,)) as pool:
        futs = {i: pool.submit(_run_one, specs[i], runs_dir, device, keep_sessions)
                for i in order}
        return [futs[i].result() for i in range(len(specs))]


def main(argv: list[str]) -> int:
    from ..toy import TASKS
    ap = argparse.ArgumentParser(prog="python -m hero_engine bench", description=__doc__)
    ap.add_argument("--tasks", default=",".join(sorted(TASKS)))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated; one of {METHODS}, or a variant with settings "
                         f"changed, e.g. hero+extra_ratio=0 (an ablation)")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    ap.add_argument("--budget", type=int, default=512, help="marks per session")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-n", type=int, default=BENCH_EVAL_N,
                    help=f"fresh samples for the base and the final evaluation (default "
                         f"{BENCH_EVAL_N})")
    ap.add_argument("--eval-n-mid", type=int, default=None,
                    help="fresh samples for the evaluations between the first and the last "
                         "(default --eval-n; the same draws for every method and seed)")
    ap.add_argument("--steps", type=int, default=BENCH_STEPS,
                    help=f"DDIM steps for training and evaluation (default {BENCH_STEPS})")
    ap.add_argument("--ppo-timesteps", type=int, default=BENCH_PPO_TIMESTEPS,
                    help="timesteps trained per sample by PPO / D3PO, every method "
                         f"(default {BENCH_PPO_TIMESTEPS})")
    ap.add_argument("--lr", type=float, default=TOY_LR["ppo"],
                    help="LoRA learning rate of the DDPO methods (toy scale)")
    ap.add_argument("--d3po-lr", type=float, default=BENCH_D3PO_LR,
                    help=f"LoRA learning rate of d3po (default {BENCH_D3PO_LR})")
    ap.add_argument("--rwr-lr", type=float, default=BENCH_RWR_LR,
                    help=f"LoRA learning rate of the reward-weighted denoising methods (default "
                         f"{BENCH_RWR_LR})")
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
                    help="not in HERO: share of each guided batch kept at N(0, I)")
    ap.add_argument("--flip-rates", default="0,0.1",
                    help="the simulated people: for each rate, a person who marks each image "
                         "wrongly with that chance (0 = exact); success is always judged by the "
                         "true scores")
    ap.add_argument("--flip-rate", type=float, default=None,
                    help="one simulated person only (overrides --flip-rates)")
    ap.add_argument("--out", default="hero_out/bench")
    ap.add_argument("--report", default=None, metavar="BENCH_JSON[,BENCH_JSON...]",
                    help="run nothing: write the table and plots of earlier bench.json files "
                         "(reported together, and merged into --out/bench.json) to --out")
    add_runtime_args(ap)
    a = ap.parse_args(argv)
    if a.report:
        return report(a.report, Path(a.out))
    device = apply_runtime_args(a)
    try:
        flips = ([a.flip_rate] if a.flip_rate is not None
                 else [float(f) for f in a.flip_rates.split(",") if f])
    except ValueError:
        ap.error(f"--flip-rates must be numbers separated by commas, got {a.flip_rates!r}")
    for f in flips:
        if not 0 <= f <= 0.5:
            ap.error(f"--flip-rate must be in [0, 0.5], got {f}")
    if not 0 <= a.fresh_ratio < 1:
        ap.error(f"--fresh-ratio must be in [0, 1), got {a.fresh_ratio}")
    if a.quick:
        a.tasks, a.methods, a.seeds, a.budget = "colour", f"{REFERENCE},{AUC_BASELINE}", "0", 256
        flips = [0.0]
    tasks = [t for t in a.tasks.split(",") if t]
    methods = []
    for m in (m for m in a.methods.split(",") if m):
        try:
            methods.append((m, *parse_method(m)))
        except ValueError as e:
            ap.error(str(e))
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
    from ..session import HeroConfig

    def spec(task, seed, flip, label, method, over):
        over = dict(over)
        if a.fresh_ratio and "fresh_ratio" not in over:
            over["fresh_ratio"] = a.fresh_ratio
        update = HeroConfig(method=method, **{k: v for k, v in over.items()
                                              if "." not in k}).update
        lr = {"d3po": a.d3po_lr, "rwr": a.rwr_lr}.get(update, a.lr)
        return ExperimentSpec(task=task, method=method, label=label, rounds=rounds,
                              batch_size=a.batch_size, seed=seed, eval_n=a.eval_n,
                              eval_n_mid=a.eval_n_mid,
                              steps=a.steps, lr=lr,
                              ppo_timesteps=a.ppo_timesteps, ppo_batch=BENCH_PPO_BATCH,
                              encoder_epochs=a.encoder_epochs, encoder_lr=BENCH_ENCODER_LR,
                              score_fn=score_fn, threshold=a.threshold, prompt=a.prompt,
                              flip_rate=flip, hero=over)

    specs = [spec(task, seed, flip, label, method, over)
             for flip in flips for task in tasks for seed in seeds
             for label, method, over in methods]
    workers = a.workers or (1 if device != "cpu" else min(len(specs), os.cpu_count() or 1))
    t0 = time.time()
    results = run_all(specs, out / "runs", device, workers, a.threads, a.keep_sessions)
    meta = {"seeds": len(seeds), "eval_n": a.eval_n, "eval_n_mid": a.eval_n_mid,
            "batch_size": a.batch_size,
            "budget": rounds * a.batch_size, "steps": a.steps, "ppo_timesteps": a.ppo_timesteps,
            "encoder_epochs": a.encoder_epochs, "flip_rates": flips,
            "fresh_ratio": a.fresh_ratio,
            "lr": a.lr, "d3po_lr": a.d3po_lr, "rwr_lr": a.rwr_lr, "encoder_lr": BENCH_ENCODER_LR, "device": device,
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


def report(bench_json, out: Path) -> int:
    """Table and plots again from earlier runs' bench.json (nothing is run). Several files
    (comma-separated) are reported together: a protocol run in parts, e.g. one person at a time.
    The meta is the first file's, with the run times added up and every command listed."""
    files = [Path(p) for p in str(bench_json).split(",") if p]
    results, meta = [], None
    for f in files:
        try:
            data = json.loads(f.read_text())
            runs, m = data["runs"], data["meta"]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--report needs bench.json files written by this command; {f}: {e}")
        results += runs
        if meta is None:
            meta = dict(m, parts=[m.get("argv")])
        else:
            meta["seconds"] = (meta.get("seconds") or 0) + (m.get("seconds") or 0)
            meta["parts"].append(m.get("argv"))
    # the parts may hold different seeds: the table is over the most seeds any row has
    per_row = collections.Counter((r["task"], r["method"], r.get("flip_rate")) for r in results)
    meta["seeds"] = max(per_row.values(), default=0)
    if len(files) > 1:
        (Path(out) / "bench.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench.json").write_text(json.dumps(
            {"meta": meta, "summary": summarise(results), "runs": results}, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    _write_report(results, meta, out)
    return 0
