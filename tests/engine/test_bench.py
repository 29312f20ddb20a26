"""The benchmark's bookkeeping: milestones, marks-to-target, ratios, the evaluator plug-in."""
import pytest

from hero_engine.bench import load_evaluator, markdown, marks_to_reach, success_at, summarise


def run(method, seed, successes, batch=64):
    curve = [{"labels": i * batch, "success": s, "good_rate": None} for i, s in enumerate(successes)]
    return {"task": "t", "method": method, "seed": seed, "curve": curve, "marks": curve[-1]["labels"],
            "success_before": successes[0], "success_after": successes[-1],
            "diversity_before": 0.2, "diversity_after": 0.1}


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
    sm = summarise(runs)["t"]
    assert sm["hero"]["marks_to_80"] == 128
    assert sm["ddpo-binary"]["marks_to_80"] == 384     # median of 384, 384, never
    assert sm["ddpo-binary"]["ratio_80"] == pytest.approx(3.0)
    assert sm["d3po"]["marks_to_80"] == float("inf") and sm["d3po"]["ratio_80"] == float("inf")
    md = markdown(sm and summarise(runs), {"seeds": 3, "eval_n": 128, "batch_size": 64, "budget": 384})
    assert "| t | d3po |" in md and "never" in md and "| 3 |" in md


def test_custom_evaluator_loader():
    f = load_evaluator("hero_engine.toy.tasks:colour_mask")
    assert callable(f)
    with pytest.raises(SystemExit, match="module:function"):
        load_evaluator("nocolon")
    with pytest.raises(SystemExit, match="cannot load evaluator"):
        load_evaluator("hero_engine.toy.tasks:does_not_exist")
