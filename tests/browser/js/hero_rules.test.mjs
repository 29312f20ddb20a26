// node --test tests/browser/js
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { MarkState, moveFocus, formatSeconds, etaText } from "../../../web/js/hero_rules.js";

test("round 0 needs good, bad and a best", () => {
  const s = new MarkState(4);
  assert.deepEqual(s.counts(), { good: 0, bad: 4, best: null });
  assert.ok(s.problems().some((p) => p.includes("good")));
  s.toggle(1);
  assert.deepEqual(s.problems(), ["pick the best image (S or double-click)"]);
  s.toggleBest(2);
  assert.ok(s.valid);
  assert.deepEqual(s.payload("t"), { token: "t", good: [1, 2], bad: [0, 3], best: 2 });
});

test("later rounds may keep the current best", () => {
  const s = new MarkState(3, { hasCurrentBest: true });
  s.toggle(0);
  assert.ok(s.valid);
  assert.equal(s.payload("x").best, null);
});

test("unmarking the best clears it; all good needs a bad", () => {
  const s = new MarkState(3, { defaultMark: "good" });
  s.toggleBest(1);
  assert.ok(s.problems().includes("mark at least one image bad (B)"));
  s.setGood(1, false);
  assert.equal(s.best, null);
  s.allGood();
  assert.equal(s.counts().bad, 0);
});

test("undo restores each step", () => {
  const s = new MarkState(3);
  s.toggle(0); s.toggleBest(2); s.allGood();
  assert.ok(s.undo());
  assert.deepEqual(s.payload("t"), { token: "t", good: [0, 2], bad: [1], best: 2 });
  s.undo(); s.undo();
  assert.deepEqual(s.counts(), { good: 0, bad: 3, best: null });
  assert.equal(s.undo(), false);
});

test("grid focus moves", () => {
  assert.equal(moveFocus(0, "ArrowLeft", 4, 10), 0);
  assert.equal(moveFocus(3, "ArrowRight", 4, 10), 4);
  assert.equal(moveFocus(1, "ArrowDown", 4, 10), 5);
  assert.equal(moveFocus(7, "ArrowDown", 4, 10), 7);
  assert.equal(moveFocus(5, "ArrowUp", 4, 10), 1);
  assert.equal(moveFocus(5, "End", 4, 10), 9);
});

test("the wait after Submit is estimated from the last round's times", () => {
  assert.equal(formatSeconds(5.4), "5 s");
  assert.equal(formatSeconds(65), "1 min 5 s");
  assert.equal(formatSeconds(120), "2 min");
  assert.equal(formatSeconds(3720), "1 h 2 min");
  assert.equal(etaText(null), "");
  assert.equal(etaText({ train_seconds: null, generate_seconds: null, seconds: null }), "");
  assert.equal(etaText({ train_seconds: 40, generate_seconds: 25, seconds: 65 }),
               "next batch about 1 min 5 s after Submit (training 40 s + generating 25 s, as last round)");
  assert.ok(etaText({ train_seconds: null, generate_seconds: 25, seconds: null }).includes("about 25 s generating"));
});

// the marking rules as one table, shared with the engine's tests (tests/engine/test_mechanisms.py)
const RULE_CASES = JSON.parse(readFileSync(new URL("../../support/rule_cases.json", import.meta.url),
                                           "utf8")).cases;

test("the shared rule table: the panel's problems agree with the engine's rules", () => {
  let checked = 0;
  for (const c of RULE_CASES) {
    if (c.js === null) continue; // marks the panel cannot produce
    const s = new MarkState(c.n, { hasCurrentBest: c.has_current_best });
    s.good = Array.from({ length: c.n }, (_, i) => c.good.includes(i));
    s.best = c.best;
    assert.deepEqual(s.problems(), c.js, JSON.stringify(c));
    assert.equal(s.valid, c.error === null, JSON.stringify(c));
    if (c.error === null) assert.deepEqual(s.payload("t"), { token: "t", good: c.good, bad: c.bad, best: c.best });
    checked++;
  }
  assert.ok(checked >= 7, `only ${checked} cases checked`);
});
