// HERO marking rules and undo, without DOM (unit-tested with `node --test tests/browser/js`).
// Mirrors hero_engine.feedback.Marks.validate: every image good or bad, at least one of each,
// the best is a good image, and a best is required while the session has none.

export class MarkState {
  constructor(n, { defaultMark = "bad", hasCurrentBest = false } = {}) {
    if (!Number.isInteger(n) || n < 1) throw new Error(`bad batch size ${n}`);
    this.n = n;
    this.hasCurrentBest = !!hasCurrentBest;
    this.good = new Array(n).fill(defaultMark === "good");
    this.best = null;
    this.history = [];
  }

  _push() {
    this.history.push({ good: this.good.slice(), best: this.best });
    if (this.history.length > 500) this.history.shift();
  }

  _check(i) {
    if (!Number.isInteger(i) || i < 0 || i >= this.n) throw new RangeError(`image ${i} out of range`);
  }

  setGood(i, value) {
    this._check(i);
    if (this.good[i] === !!value) return false;
    this._push();
    this.good[i] = !!value;
    if (!value && this.best === i) this.best = null;
    return true;
  }

  toggle(i) {
    this._check(i);
    return this.setGood(i, !this.good[i]);
  }

  // Pick i as the best (marks it good); picking the current best again unpicks it.
  toggleBest(i) {
    this._check(i);
    this._push();
    if (this.best === i) {
      this.best = null;
    } else {
      this.best = i;
      this.good[i] = true;
    }
    return true;
  }

  allGood() {
    if (this.good.every(Boolean)) return false;
    this._push();
    this.good.fill(true);
    return true;
  }

  undo() {
    const s = this.history.pop();
    if (!s) return false;
    this.good = s.good;
    this.best = s.best;
    return true;
  }

  get canUndo() {
    return this.history.length > 0;
  }

  counts() {
    const good = this.good.filter(Boolean).length;
    return { good, bad: this.n - good, best: this.best };
  }

  // Reasons the marks cannot be submitted yet (empty = ready).
  problems() {
    const { good, bad } = this.counts();
    const out = [];
    if (this.n < 2) out.push("a round needs at least 2 images");
    if (good === 0) out.push("mark at least one image good (G)");
    if (bad === 0) out.push("mark at least one image bad (B)");
    if (this.best === null && !this.hasCurrentBest)
      out.push("pick the best image (S or double-click)");
    if (this.best !== null && !this.good[this.best]) out.push("the best image must be good");
    return out;
  }

  get valid() {
    return this.problems().length === 0;
  }

  payload(token) {
    const good = [], bad = [];
    this.good.forEach((g, i) => (g ? good : bad).push(i));
    return { token, good, bad, best: this.best };
  }
}

// Grid navigation: index after moving `key` in a grid of `cols` columns holding `n` items.
export function moveFocus(i, key, cols, n) {
  cols = Math.max(1, cols | 0);
  switch (key) {
    case "ArrowLeft": return Math.max(0, i - 1);
    case "ArrowRight": return Math.min(n - 1, i + 1);
    case "ArrowUp": return i - cols >= 0 ? i - cols : i;
    case "ArrowDown": return i + cols < n ? i + cols : i;
    case "Home": return 0;
    case "End": return n - 1;
    default: return i;
  }
}

// "1 min 5 s" for 65 seconds (whole seconds; minutes and hours above a minute / an hour).
export function formatSeconds(s) {
  s = Math.max(0, Math.round(Number(s) || 0));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min` + (s % 60 ? ` ${s % 60} s` : "");
  const m = Math.round((s % 3600) / 60);
  return `${Math.floor(s / 3600)} h` + (m ? ` ${m} min` : "");
}

// The wait after Submit, from the request's eta {train_seconds, generate_seconds, seconds}
// (the last round's times, nodes/feedback.py): "" when nothing is known yet.
export function etaText(eta) {
  if (!eta) return "";
  const tr = eta.train_seconds, gen = eta.generate_seconds;
  if (tr != null && gen != null) {
    return `next batch about ${formatSeconds(tr + gen)} after Submit ` +
           `(training ${formatSeconds(tr)} + generating ${formatSeconds(gen)}, as last round)`;
  }
  if (gen != null) return `after Submit: training (timed after the first round), then about ${formatSeconds(gen)} generating`;
  if (tr != null) return `after Submit: about ${formatSeconds(tr)} training, then generating`;
  return "";
}
