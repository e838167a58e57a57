// Indents XML for reading. A tolerant tokenizer (no XML parser object): malformed
// input still comes out readable, and nothing is ever interpreted.

/** Splits XML into tokens `{k: "open"|"close"|"self"|"text"|"other", s}`. */
function tokenize(src) {
  const out = [];
  let i = 0;
  const n = src.length;
  while (i < n) {
    if (src[i] !== "<") {
      const j = src.indexOf("<", i);
      const end = j < 0 ? n : j;
      out.push({ k: "text", s: src.slice(i, end) });
      i = end;
      continue;
    }
    let end;
    let k = "other";
    if (src.startsWith("<!--", i)) {
      end = src.indexOf("-->", i + 4);
      end = end < 0 ? n : end + 3;
    } else if (src.startsWith("<![CDATA[", i)) {
      end = src.indexOf("]]>", i + 9);
      end = end < 0 ? n : end + 3;
    } else if (src.startsWith("<?", i)) {
      end = src.indexOf("?>", i + 2);
      end = end < 0 ? n : end + 2;
    } else {
      // a tag: find the closing '>' outside quoted attribute values
      let j = i + 1;
      let quote = "";
      while (j < n) {
        const c = src[j];
        if (quote) {
          if (c === quote) quote = "";
        } else if (c === '"' || c === "'") quote = c;
        else if (c === ">") break;
        j++;
      }
      end = j < n ? j + 1 : n;
      const tag = src.slice(i, end);
      if (tag.startsWith("</")) k = "close";
      else if (tag.startsWith("<!")) k = "other";
      else if (tag.endsWith("/>")) k = "self";
      else k = "open";
    }
    out.push({ k, s: src.slice(i, end) });
    i = end;
  }
  return out;
}

/**
 * Indented lines; each line is `{depth, parts: [[cls, text]…]}` so the viewer
 * can colour tags without parsing anything as markup.
 */
export function prettyXmlLines(src) {
  const toks = tokenize(src);
  const lines = [];
  let depth = 0;
  for (let t = 0; t < toks.length; t++) {
    const tok = toks[t];
    if (tok.k === "text") {
      const text = tok.s.trim();
      if (text) lines.push({ depth, parts: [["xml-text", text]] });
      continue;
    }
    if (tok.k === "open") {
      // <a>text</a> stays on one line
      const next = toks[t + 1];
      const after = toks[t + 2];
      if (next && next.k === "text" && after && after.k === "close" && !next.s.includes("\n")) {
        lines.push({ depth, parts: [...tagParts(tok.s), ["xml-text", next.s.trim()], ...tagParts(after.s)] });
        t += 2;
        continue;
      }
      if (next && next.k === "close") {
        lines.push({ depth, parts: [...tagParts(tok.s), ...tagParts(next.s)] });
        t += 1;
        continue;
      }
      lines.push({ depth, parts: tagParts(tok.s) });
      depth++;
      continue;
    }
    if (tok.k === "close") {
      depth = Math.max(0, depth - 1);
      lines.push({ depth, parts: tagParts(tok.s) });
      continue;
    }
    const cls = tok.s.startsWith("<!--") ? "xml-comment" : tok.s.startsWith("<![CDATA[") ? "xml-text" : "xml-decl";
    lines.push({ depth, parts: tok.k === "self" ? tagParts(tok.s) : [[cls, tok.s]] });
  }
  return lines;
}

/** Splits `<name a="1" b='2'>` into coloured parts. */
function tagParts(tag) {
  const m = /^(<\/?)([^\s/>]*)([\s\S]*?)(\/?>)?$/.exec(tag);
  if (!m) return [["xml-tag", tag]];
  const parts = [["xml-tag", m[1] + m[2]]];
  const attrs = m[3] || "";
  const re = /(\s+)([^\s=]+)(?:(\s*=\s*)("[^"]*"|'[^']*'|[^\s"']+))?/gy;
  let last = 0;
  let a;
  while ((a = re.exec(attrs)) !== null) {
    parts.push(["", " "], ["xml-attr", a[2]]);
    if (a[3]) parts.push(["xml-punct", "="], ["xml-value", a[4]]);
    last = re.lastIndex;
  }
  if (last < attrs.length) parts.push(["", attrs.slice(last)]);
  if (m[4]) parts.push(["xml-tag", m[4]]);
  return parts;
}

/** Indented XML as plain text (for diffs). */
export function prettyXmlText(src, indent = 2) {
  return prettyXmlLines(src)
    .map((l) => " ".repeat(l.depth * indent) + l.parts.map((p) => p[1]).join(""))
    .join("\n");
}
