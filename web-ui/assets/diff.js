// Line diff (Myers' O(ND) algorithm) and header comparison.

/** Beyond this many differences, give up on a minimal diff. */
const MAX_D = 3000;

/**
 * Diffs two arrays of lines. Returns ops in order: `{op:"same", a, b}`,
 * `{op:"del", a}` and `{op:"add", b}` where `a`/`b` are indexes into the inputs.
 */
export function diffLines(a, b) {
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) {
    endA--;
    endB--;
  }
  const ops = [];
  for (let i = 0; i < start; i++) ops.push({ op: "same", a: i, b: i });
  const mid = myers(a.slice(start, endA), b.slice(start, endB));
  for (const o of mid) {
    if (o.op === "same") ops.push({ op: "same", a: o.a + start, b: o.b + start });
    else if (o.op === "del") ops.push({ op: "del", a: o.a + start });
    else ops.push({ op: "add", b: o.b + start });
  }
  for (let i = endA, j = endB; i < a.length; i++, j++) ops.push({ op: "same", a: i, b: j });
  return ops;
}

function myers(a, b) {
  const n = a.length;
  const m = b.length;
  if (n === 0) return b.map((_, j) => ({ op: "add", b: j }));
  if (m === 0) return a.map((_, i) => ({ op: "del", a: i }));
  const max = n + m;
  const off = max + 1;
  const v = new Int32Array(2 * max + 3);
  // trace[d] holds v[-d..d] as it was before step d (compact: O(D²) memory)
  const trace = [];
  for (let d = 0; d <= max; d++) {
    if (d > MAX_D) return coarse(n, m);
    trace.push(v.slice(off - d, off + d + 1));
    for (let k = -d; k <= d; k += 2) {
      let x = k === -d || (k !== d && v[off + k - 1] < v[off + k + 1]) ? v[off + k + 1] : v[off + k - 1] + 1;
      let y = x - k;
      while (x < n && y < m && a[x] === b[y]) {
        x++;
        y++;
      }
      v[off + k] = x;
      if (x >= n && y >= m) return backtrack(trace, n, m);
    }
  }
  return coarse(n, m);
}

function backtrack(trace, n, m) {
  const ops = [];
  let x = n;
  let y = m;
  for (let d = trace.length - 1; d >= 0; d--) {
    const vd = trace[d];
    const at = (k) => vd[k + d];
    const k = x - y;
    const prevK = k === -d || (k !== d && at(k - 1) < at(k + 1)) ? k + 1 : k - 1;
    const prevX = d === 0 ? 0 : at(prevK);
    const prevY = prevX - prevK;
    while (x > prevX && y > prevY) {
      x--;
      y--;
      ops.push({ op: "same", a: x, b: y });
    }
    if (d > 0) {
      if (x === prevX) ops.push({ op: "add", b: prevY });
      else ops.push({ op: "del", a: prevX });
    }
    x = prevX;
    y = prevY;
  }
  return ops.reverse();
}

function coarse(n, m) {
  const ops = [];
  for (let i = 0; i < n; i++) ops.push({ op: "del", a: i });
  for (let j = 0; j < m; j++) ops.push({ op: "add", b: j });
  return ops;
}

/**
 * Pairs diff ops into side-by-side rows: `{kind, left, right}` where kind is
 * "same" | "change" | "del" | "add" and left/right are line indexes or null.
 */
export function sideBySide(ops) {
  const rows = [];
  let dels = [];
  let adds = [];
  const flush = () => {
    const n = Math.max(dels.length, adds.length);
    for (let i = 0; i < n; i++) {
      const l = i < dels.length ? dels[i] : null;
      const r = i < adds.length ? adds[i] : null;
      rows.push({ kind: l !== null && r !== null ? "change" : l !== null ? "del" : "add", left: l, right: r });
    }
    dels = [];
    adds = [];
  };
  for (const o of ops) {
    if (o.op === "same") {
      flush();
      rows.push({ kind: "same", left: o.a, right: o.b });
    } else if (o.op === "del") dels.push(o.a);
    else adds.push(o.b);
  }
  flush();
  return rows;
}

/**
 * Compares two header lists by name. Returns rows `{name, kind, before, after}`
 * with kind "same" | "changed" | "added" | "removed"; values of repeated
 * headers are joined with newlines. Order: the original's, then new names.
 */
export function diffHeaders(before, after) {
  const group = (list) => {
    const m = new Map();
    for (const hd of list || []) {
      const name = String(hd.name).toLowerCase();
      if (!m.has(name)) m.set(name, []);
      m.get(name).push(hd.value);
    }
    return m;
  };
  const a = group(before);
  const b = group(after);
  const rows = [];
  for (const [name, vals] of a) {
    const before = vals.join("\n");
    if (!b.has(name)) rows.push({ name, kind: "removed", before, after: null });
    else {
      const after = b.get(name).join("\n");
      rows.push({ name, kind: before === after ? "same" : "changed", before, after });
    }
  }
  for (const [name, vals] of b) {
    if (!a.has(name)) rows.push({ name, kind: "added", before: null, after: vals.join("\n") });
  }
  return rows;
}
