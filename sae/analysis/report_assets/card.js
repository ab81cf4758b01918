// Feature cards, drawn from the card data of sae/analysis/report.py (its docstring has the
// layout): shared by the report (report.js) and the explorer (sae/serve/assets/explorer.js).
// Dataset text is untrusted: every data string goes into the page as text (textContent /
// createTextNode), never as HTML.
"use strict";
const SAECard = (() => {
  const SVG_NS = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
  // ---- small DOM helpers ----------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);  // strings become text nodes
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const fmt = (x) => (x === null || x === undefined ? "–" : String(x));
  // Whitespace made visible: a token that is a newline must not look like nothing.
  const visible = (s) => s.replace(/\r/g, "␍").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  const shown = (s) => visible(s) || "∅";
  // A token on its own (index, logit tables): spaces-only must not look empty either.
  const shownAlone = (s) => (/^ +$/.test(s) ? "␣".repeat(s.length) : shown(s));

  // strings: the string table the card refers to; bytes: string index -> raw bytes;
  // edges: the histogram's bin edges; open(g), if given: what a nearest-feature link does
  // (else it is a plain #f=g link).
  function renderer({ strings, bytes, edges, open }) {
    function body(d, max) {
      const out = [el("h3", { text: `Top examples (${d.ex.length})` })];
      if (!d.ex.length) out.push(el("p", { class: "note", text: "It never fired in the scan." }));
      for (const ex of d.ex) out.push(example(ex, max));
      const bins = d.q.length;
      const quant = [];
      for (let b = bins - 1; b >= 0; b--) {  // highest bin first, continuing down from the top examples
        if (!d.q[b].length) continue;
        const lo = Math.round((100 * b) / bins), hi = Math.round((100 * (b + 1)) / bins);
        quant.push(el("h4", { text: `activation quantiles ${lo}–${hi}% (${d.q[b].length} random sample${d.q[b].length === 1 ? "" : "s"})` }));
        for (const ex of [...d.q[b]].reverse()) quant.push(example(ex, max));  // largest first, as above
      }
      if (quant.length) out.push(el("h3", { text: "Samples by activation quantile" }), ...quant);
      out.push(el("h3", { text: "Activation histogram" }), histogram(d.h));
      if (d.lt) {
        out.push(el("h3", { text: "Logit effects" }),
          el("div", { class: "cols" }, logitTable("promoted", d.lt), logitTable("suppressed", d.lb)));
      }
      if (d.nn) {
        const links = d.nn.map(([g, c]) => {
          const a = el("a", { href: "#f=" + g, title: "cosine " + c, text: `${g} (${c})` });
          if (open) a.addEventListener("click", (e) => { e.preventDefault(); open(g); });
          return a;
        });
        out.push(el("h3", { text: "Nearest features (decoder cosine)" }), el("div", { class: "near" }, ...links));
      }
      return out;
    }
    // Each token's text within an example. A token holding part of a multi-byte character
    // shows the characters its bytes complete (maybe none), so the tokens read exactly as
    // the decoded text; bytes that never complete one show as U+FFFD, as the tokenizer's do.
    function tokenTexts(toks) {
      const decoder = new TextDecoder("utf-8", { ignoreBOM: true });  // keep a BOM, as Python does
      const out = toks.map((t) => (bytes[t] !== undefined
        ? decoder.decode(Uint8Array.from(bytes[t]), { stream: true })
        : decoder.decode() + strings[t]));
      if (out.length) out[out.length - 1] += decoder.decode();
      return out;
    }
    function example([v, centre, toks, acts], max) {
      const row = el("div", { class: "ex" }, el("span", { class: "v", text: fmt(v) }));
      const texts = tokenTexts(toks);
      toks.forEach((t, i) => {
        const a = acts[i];
        const span = el("span", { class: i === centre ? "tok ctr" : "tok", title: String(a) });
        // Only a token that decodes to nothing is marked (∅); byte pieces are legitimately empty.
        span.textContent = bytes[t] !== undefined ? visible(texts[i]) : shown(texts[i]);
        if (a > 0) span.style.backgroundColor = `rgba(var(--hot), ${Math.min(1, a / max).toFixed(3)})`;
        row.append(span);
      });
      return row;
    }
    function logitTable(label, rows) {
      const body = rows.map(([t, v]) => el("tr", {}, el("td", { class: "t", text: shownAlone(strings[t]) }), el("td", { class: "n", text: fmt(v) })));
      return el("div", {}, el("h4", { text: label }), el("table", { class: "logits" }, ...body));
    }
    function histogram([first, counts]) {
      if (!counts.length) return el("p", { class: "note", text: "no activations" });
      const W = 420, H = 120, left = 40, bottom = 18, top = 6;
      const w = W - left - 6, h = H - top - bottom, bw = w / counts.length, peak = Math.max(...counts);
      const node = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
      node.append(svg("title", {}, "activation histogram (log2 bins)"));
      const edge = (i) => (i < edges.length ? edges[i] : edges[i - 1] * (edges[1] / edges[0]));
      counts.forEach((c, i) => {
        const bh = (h * c) / peak;
        const bar = svg("rect", { x: (left + i * bw).toFixed(1), y: (top + h - bh).toFixed(1), width: Math.max(bw - 1, 0.5).toFixed(1), height: bh.toFixed(1) });
        bar.append(svg("title", {}, `${fmt(edge(first + i))} … ${fmt(edge(first + i + 1))}: ${c}`));
        node.append(bar);
      });
      node.append(svg("text", { x: left - 3, y: top + 8, class: "r" }, String(peak)),
        svg("text", { x: left - 3, y: top + h, class: "r" }, "0"),
        svg("text", { x: left, y: H - 4 }, fmt(edge(first))),
        svg("text", { x: W - 6, y: H - 4, class: "r" }, fmt(edge(first + counts.length))));
      return node;
    }

    return { body, example };
  }
  return { el, svg, fmt, visible, shown, shownAlone, renderer };
})();
