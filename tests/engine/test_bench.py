"""The benchmark: its bookkeeping (milestones, marks-to-target, ratios), the evaluator plug-in,
and reduced runs end to end."""
import json
from pathlib import Path

import pytest

from hero_engine.harness.bench import (area_under, bootstrap_interval, load_evaluator, markdown,
                               marks_to_reach, parse_method, success_at, summarise, verdict)


def run(method, seed, successes, batch=64, flip=0.0, session=None):
    session = session or successes
    curve = [{"labels": i * batch, "success": s, "good_rate": None, "session_success": q}
             for i, (s, q) in enumerate(zip(successes, session))]
    return {"task": "t", "method": method, "seed": seed, "curve": curve, "marks": curve[-1]["labels"],
            "success_before": successes[0], "success_after": successes[-1],
            "diversity_before": 0.2, "diversity_after": 0.1, "flip_rate": flip}


def test_milestones_and_targets():
    c = run("hero", 0, [0.2, 0.3, 0.55, 0.6, 0.85])["curve"]
    assert success_at(c, 128) == 0.55 and success_at(c, 200) == 0.6
    assert success_at(c, 512) is None          # the budget (256) stopped short of 512
    assert marks_to_reach(c, 0.5) == 128 and marks_to_reach(c, 0.8) == 256
    assert marks_to_reach(c, 0.9) is None


def test_summary_medians_and_ratios():
    runs = [run("hero", s, v) for s, v in enumerate([[0.2, 0.5, 0.8], [0.2, 0.4, 0.9], [0.2, 0.6, 0.85]])]
    runs += [run("ddpo-binary", s, [0.2, 0.3, 0.4] + [0.5] * 3 + [0.8]) for s in range(2)]
    runs += [run("ddpo-binary", 2, [0.2, 0.3, 0.4, 0.5])]     # this seed never reaches 80%
    runs += [run("d3po", s, [0.2, 0.25, 0.3]) for s in range(3)]
    sm = summarise(runs)["exact"]["t"]
    assert sm["hero"]["marks_to_80"] == 128
    assert sm["ddpo-binary"]["marks_to_80"] == 384     # median of 384, 384, never
    assert sm["ddpo-binary"]["ratio_80"] == pytest.approx(3.0)
    assert sm["d3po"]["marks_to_80"] == float("inf") and sm["d3po"]["ratio_80"] == float("inf")
    md = markdown(summarise(runs), {"seeds": 3, "eval_n": 128, "batch_size": 64, "budget": 384})
    assert "| t | d3po |" in md and "never" in md and "| 3 |" in md
    assert "**Simulated person: exact**" in md and "**Target check**" in md


def test_area_under_the_curve_and_paired_differences():
    c = run("hero", 0, [0.0, 0.5, 1.0])["curve"]
    assert area_under(c, 128) == pytest.approx(0.5)
    assert area_under(c, 64) == pytest.approx(0.25)
    assert area_under(c, 256) is None           # the curve stops short
    lo, hi = bootstrap_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    assert 0.1 <= lo <= 0.3 <= hi <= 0.5
    assert bootstrap_interval([0.3]) is None
    # paired by seed: ddpo-binary is 0.1 below hero on every seed, whatever the seed's level
    runs = [run("hero", s, [b, b + 0.3, b + 0.4]) for s, b in enumerate([0.1, 0.3, 0.5])]
    runs += [run("ddpo-binary", s, [b, b + 0.2, b + 0.3]) for s, b in enumerate([0.1, 0.3, 0.5])]
    runs += [run("hero", 0, [0.2, 0.2, 0.2], flip=0.1), run("ddpo-binary", 0, [0.2, 0.3, 0.3], flip=0.1)]
    sm = summarise(runs)
    assert set(sm) == {"exact", "flips 10%"}
    row = sm["exact"]["t"]["ddpo-binary"]
    assert row["auc_vs_hero"] == pytest.approx(-0.075)
    assert row["auc_vs_hero_ci"] == pytest.approx((-0.075, -0.075))
    assert row["auc_wins_vs_hero"] == (0, 3)
    assert sm["flips 10%"]["t"]["ddpo-binary"]["auc_vs_hero"] > 0
    assert sm["exact"]["t"]["hero"]["session_auc"] == sm["exact"]["t"]["hero"]["auc"]


def test_verdict_checks_the_target():
    runs = [run("hero", s, [0.2, 0.5, 0.8, 0.9]) for s in range(3)]
    runs += [run("ddpo-binary", s, [0.2, 0.3, 0.5, 0.8]) for s in range(3)]
    runs += [run("d3po", s, [0.2, 0.2, 0.2, 0.2]) for s in range(3)]
    (line,) = verdict(summarise(runs))
    assert "hero reaches 80% on 1/1 tasks (t)" in line
    assert "AUC >= ddpo-binary on 1/1" in line
    assert "ratios met on 0/1" in line     # ddpo-binary needs 192 / 128 = 1.5x hero's marks, not 2x
    runs = [run("hero", s, [0.2, 0.8, 0.9, 0.9]) for s in range(3)]
    runs += [run("ddpo-binary", s, [0.2, 0.5, 0.8, 0.9]) for s in range(3)]
    (line,) = verdict(summarise(runs))
    assert "ratios met on 0/1" in line     # 2x ddpo-binary's marks, but d3po was not run
    runs += [run("d3po", s, [0.2, 0.2, 0.2, 0.2]) for s in range(3)]
    (line,) = verdict(summarise(runs))
    assert "ratios met on 1/1" in line     # 128 vs 64 marks: ddpo-binary needs 2x, d3po never


def test_method_variants():
    assert parse_method("hero") == ("hero", {})
    assert parse_method("hero+extra_ratio=0+reward=similarity+encoder_replay=false") == (
        "hero", {"extra_ratio": 0, "reward": "similarity", "encoder_replay": False})
    with pytest.raises(ValueError, match="not a HERO setting"):
        parse_method("hero+nope=1")
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("dpo")
    with pytest.raises(ValueError, match="extra_ratio needs"):
        parse_method("ddpo-binary+extra_ratio=1")


def test_custom_evaluator_loader():
    f = load_evaluator("hero_engine.toy.tasks:colour_mask")
    assert callable(f)
    with pytest.raises(SystemExit, match="module:function"):
        load_evaluator("nocolon")
    with pytest.raises(SystemExit, match="cannot load evaluator"):
        load_evaluator("hero_engine.toy.tasks:does_not_exist")


def _bench(tmp_path, *args):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "hero_engine", "bench", "--seeds", "0",
                        "--budget", "8", "--batch-size", "4", "--eval-n", "8", "--steps", "3",
                        "--encoder-epochs", "5", "--out", str(out),
                        *(() if "--flip-rates" in args else ("--flip-rates", "0")), *args],
                       cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "bench.json").read_text()), r.stdout


def test_bench_end_to_end_two_workers(tmp_path):
    """Every method runs through the engine in parallel worker processes; success is measured
    after every round on the same fresh draws; the table and one plot per task are written."""
    out, data, stdout = _bench(tmp_path, "--tasks", "colour", "--workers", "2",
                               "--methods", "hero,hero-no-guidance,ddpo-binary,d3po")
    runs = data["runs"]
    assert [r["method"] for r in runs] == ["hero", "hero-no-guidance", "ddpo-binary", "d3po"]
    for r in runs:
        assert [p["labels"] for p in r["curve"]] == [0, 4, 8]
        assert all(0 <= p["success"] <= 1 for p in r["curve"])
        assert all(p["good_rate"] is not None for p in r["curve"][1:])
        assert r["steps"] == 3 and r["diversity_after"] > 0
    # the LoRA starts at zero: every method starts from the same model and evaluation draws
    assert len({r["success_before"] for r in runs}) == 1
    assert len({r["diversity_before"] for r in runs}) == 1
    # the methods differ after training (guidance, reward, loss)
    assert len({json.dumps(r["curve"][1:]) for r in runs}) == 4
    assert data["meta"]["workers"] == 2 and data["meta"]["budget"] == 8
    md = (out / "bench.md").read_text()
    assert md in stdout
    for m in ("hero", "hero-no-guidance", "ddpo-binary", "d3po"):
        assert f"| colour | {m} |" in md
    assert (out / "bench_colour.png").stat().st_size > 0
    # session folders are removed unless --keep-sessions; the per-session results stay
    assert all(r["session"] is None for r in runs)
    assert not list((out / "runs").glob("session-*"))
    assert len(list((out / "runs").glob("result-colour-*-s0.json"))) == 4
    # --report renders the same table again from the JSON alone
    import subprocess
    import sys
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "hero_engine", "bench", "--report",
                        str(out / "bench.json"), "--out", str(again)],
                       cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (again / "bench.md").read_text() == md and (again / "bench_colour.png").exists()


def test_bench_custom_evaluator(tmp_path):
    """A new task needs only an importable scoring function, a threshold and a prompt."""
    out, data, _ = _bench(tmp_path, "--methods", "ddpo-binary", "--workers", "1",
                          "--keep-sessions", "--flip-rates", "0.25", "--eval-n-mid", "4",
                          "--evaluator", "hero_engine.toy.tasks:score_colour",
                          "--threshold", "0.5", "--prompt", "a square")
    (run,) = data["runs"]
    assert run["task"] == "custom" and run["prompt"] == "a square"
    assert (Path(run["session"]) / "session.json").exists()      # --keep-sessions
    md = (out / "bench.md").read_text()
    assert "| custom | ddpo-binary |" in md and "Simulated person: flips 25%" in md
    assert run["flip_rate"] == 0.25 and run["curve"][0]["session_success"] is not None
    # --eval-n-mid: the base and the final evaluation on --eval-n samples, those between on fewer
    assert [p["eval_n"] for p in run["curve"]] == [8, 4, 8] and data["meta"]["eval_n_mid"] == 4
    # each session's cost is recorded: wall time, this process's CPU time, the evaluations' share
    assert 0 < run["eval_seconds"] < run["seconds"] and run["cpu_seconds"] > 0


def test_bench_rejects_bad_arguments(tmp_path):
    import subprocess
    import sys
    for args, msg in ((["--methods", "hero,dpo"], "unknown method 'dpo'"),
                      (["--tasks", "nope"], "unknown task 'nope'"),
                      (["--evaluator", "hero_engine.toy.tasks:score_colour"], "--threshold"),
                      (["--flip-rate", "0.7"], "--flip-rate must be in [0, 0.5]"),
                      (["--fresh-ratio", "1"], "--fresh-ratio must be in [0, 1)")):
        r = subprocess.run([sys.executable, "-m", "hero_engine", "bench", "--out",
                            str(tmp_path), *args], cwd=Path(__file__).resolve().parents[2],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_plot_keeps_each_method_colour(tmp_path):
    """A method has one colour in every plot, whichever methods a run compares."""
    from hero_engine.harness.bench import METHODS, plot
    from hero_engine.harness.plots import PALETTE
    from PIL import Image
    runs = [run(m, 0, [0.2, 0.4, 0.6]) for m in ("ddpo-binary",)]
    (p,) = plot(runs, tmp_path)
    swatch = Image.open(p).convert("RGB").getpixel((74, 42))   # the first legend entry's line
    assert swatch == PALETTE[METHODS.index("ddpo-binary")]


def test_each_update_rule_gets_its_toy_learning_rate():
    from hero_engine.harness.experiment import TOY_LR, toy_lr
    assert toy_lr("hero") == TOY_LR["rwr"] == toy_lr("rwr-binary")
    assert toy_lr("ddpo-binary") == TOY_LR["ppo"] == toy_lr("hero-paper")
    assert toy_lr("d3po") == TOY_LR["d3po"]
    # an ablation that swaps the update rule swaps the rate with it
    assert toy_lr("hero", {"update": "ppo", "policy.epochs": 2}) == TOY_LR["ppo"]
    assert parse_method("hero+policy.denoise_fraction=1")[1] == {"policy.denoise_fraction": 1}


def test_report_of_a_protocol_run_in_parts(tmp_path):
    """Two bench.json files (e.g. one per simulated person) are reported as one run."""
    from hero_engine.harness.bench import report
    exact = [run("hero", s, [0.2, 0.6, 0.9]) for s in range(2)]
    exact += [run("ddpo-binary", s, [0.2, 0.3, 0.4]) for s in range(2)]
    flips = [run("hero", s, [0.2, 0.5, 0.8], flip=0.1) for s in range(2)]
    meta = {"seeds": 2, "eval_n": 64, "batch_size": 64, "budget": 128}
    parts = []
    for name, runs, secs in (("a", exact, 100.0), ("b", flips, 50.0)):
        p = tmp_path / name / "bench.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"meta": dict(meta, seconds=secs, argv=[name]), "runs": runs}))
        parts.append(str(p))
    out = tmp_path / "both"
    assert report(",".join(parts), out) == 0
    merged = json.loads((out / "bench.json").read_text())
    assert len(merged["runs"]) == 6 and merged["meta"]["seconds"] == 150.0
    assert merged["meta"]["parts"] == [["a"], ["b"]]
    assert set(merged["summary"]) == {"exact", "flips 10%"}
    md = (out / "bench.md").read_text()
    assert md == markdown(summarise(exact + flips), merged["meta"])
    assert "**Simulated person: flips 10%**" in md
    with pytest.raises(SystemExit, match="bench.json"):
        report(str(tmp_path / "nope.json"), tmp_path / "x")


def test_extra_samples_are_checked_against_the_truth(tmp_path):
    """With extra samples the bench records, per round, the share the representation calls good
    and the true share of those unmarked samples, as the evaluator scores them."""
    import torch
    from hero_engine.harness.experiment import ExperimentSpec, run_experiment
    from hero_engine.toy.tasks import TASKS
    torch.set_num_threads(1)
    task = TASKS["colour"]
    extras = []

    def score(images, prompts):
        s = task.score(images, prompts)
        if len(images) == 8:          # the 2 x 4 extra samples (batches have 4, evaluations 6)
            extras.append((s >= task.threshold).float().mean().item())
        return s

    spec = ExperimentSpec(task="colour", method="hero", rounds=2, batch_size=4, seed=0, eval_n=6,
                          steps=3, lr=1e-3, encoder_epochs=5, encoder_lr=1e-4, score_fn=score,
                          threshold=task.threshold, hero={"extra_ratio": 2.0,
                                                          "policy.denoise_steps": 2})
    res = run_experiment(spec, tmp_path, save_grids=False, log=lambda s: None)
    points = res["curve"][1:]
    assert [p["extra_true_good"] for p in points] == pytest.approx(extras) and len(extras) == 2
    assert all(0 <= p["extra_predicted_good"] <= 1 and 0 <= p["extra_label_accuracy"] <= 1
               for p in points)
    assert res["curve"][0].get("extra_true_good") is None
