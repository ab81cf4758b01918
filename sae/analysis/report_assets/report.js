// Feature dashboard (sae/analysis/report.py): the index table and the lazily decoded feature cards.
// Dataset text is untrusted: every data string goes into the page as text (textContent /
// createTextNode), never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const readJSON = (id) => JSON.parse($(id).textContent);
  const INDEX = readJSON("index");   // {M, block, edges, cards, columns, data}
  const STR = readJSON("strings");   // decoded tokens; the data refers to them by index
  const BYTES = readJSON("bytes");   // string index -> raw bytes, for tokens holding part of a character
  const DATA = INDEX.data;
  const M = INDEX.M;
  const HAS_CARD = INDEX.cards === null ? null : new Set(INDEX.cards);

  const { el, fmt, shownAlone } = SAECard;
  const cards = SAECard.renderer({ strings: STR, bytes: BYTES, edges: INDEX.edges });

  // ---- card blocks: gzip + base64 JSON, decoded once on first use -------------------------
  const blocks = new Map();
  function loadBlock(n) {
    if (!blocks.has(n)) blocks.set(n, decodeBlock(n));
    return blocks.get(n);
  }
  async function decodeBlock(n) {
    const node = $("b-" + n);
    if (!node) return {};
    const bin = atob(JSON.parse(node.textContent));
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }
  async function cardData(f) {
    if (HAS_CARD !== null && !HAS_CARD.has(f)) return null;
    const block = await loadBlock(Math.floor(f / INDEX.block));
    return block[String(f)] || null;
  }

  // ---- index: sort, filter, paginate (only one page of rows is ever in the DOM) ----------
  // Initial order from the builder: with contrast columns, the first of them largest first.
  const state = { key: INDEX.sort.key, desc: INDEX.sort.desc, query: "", page: 0, size: 100, open: -1 };
  let order = [];  // feature ids passing the filter, in sort order
  const value = (key, f) => (key === "id" ? f : DATA[key][f]);

  function compare(key, desc) {
    const sign = desc ? -1 : 1;
    const get = key === "top" ? (f) => (DATA.top[f] === null ? null : STR[DATA.top[f]]) : (f) => value(key, f);
    return (a, b) => {
      const x = get(a), y = get(b);
      if (x === y) return a - b;
      if (x === null) return 1;  // missing values last, whichever the direction
      if (y === null) return -1;
      return (x < y ? -1 : 1) * sign;
    };
  }
  function filtered() {
    const q = state.query.trim();
    const all = Array.from({ length: M }, (_, f) => f);
    if (!q) return all;
    const id = /^\d+$/.test(q) ? Number(q) : -1;
    const low = q.toLowerCase();
    return all.filter((f) => f === id || (DATA.top[f] !== null && STR[DATA.top[f]].toLowerCase().includes(low)));
  }
  function recompute() {
    order = filtered();
    if (state.key !== "id" || state.desc) order.sort(compare(state.key, state.desc));
    state.page = 0;
    renderIndex();
  }
  function buildHeader() {
    const row = document.querySelector("#feature-index thead tr");
    for (const col of INDEX.columns) {
      const th = el("th", { text: col.label, title: col.help || col.label, "data-key": col.key });
      if (col.key === "top") th.classList.add("text");
      th.addEventListener("click", () => {
        // First click: numbers largest first, ids and tokens ascending; again: reversed.
        if (state.key === col.key) state.desc = !state.desc;
        else { state.key = col.key; state.desc = col.key !== "id" && col.key !== "top"; }
        recompute();
      });
      row.append(th);
    }
  }
  function renderIndex() {
    const pages = Math.max(1, Math.ceil(order.length / state.size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    const start = state.page * state.size;
    const rows = order.slice(start, start + state.size).map((f) => {
      const tr = el("tr", { "data-f": String(f) });
      for (const col of INDEX.columns) {
        if (col.key === "top") tr.append(el("td", { class: "text", text: DATA.top[f] === null ? "–" : shownAlone(STR[DATA.top[f]]) }));
        else tr.append(el("td", { text: fmt(value(col.key, f)) }));
      }
      if (f === state.open) tr.classList.add("open");
      tr.addEventListener("click", () => select(f));
      return tr;
    });
    document.querySelector("#feature-index tbody").replaceChildren(...rows);
    $("page-info").textContent = `page ${state.page + 1} of ${pages} (${order.length.toLocaleString()} features)`;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
    for (const th of document.querySelectorAll("#feature-index th")) {
      const on = th.dataset.key === state.key;
      th.classList.toggle("sorted", on);
      th.classList.toggle("asc", on && !state.desc);
    }
  }

  // ---- card -------------------------------------------------------------------------------
  function select(f) {
    if (location.hash !== "#f=" + f) location.hash = "f=" + f;  // hashchange opens it
    else openCard(f);
  }
  function fromHash() {
    const m = /^#f=(\d+)$/.exec(location.hash);
    if (m && Number(m[1]) < M) openCard(Number(m[1]));
  }
  async function openCard(f) {
    state.open = f;
    for (const tr of document.querySelectorAll("#feature-index tbody tr")) tr.classList.toggle("open", tr.dataset.f === String(f));
    const card = $("card");
    card.replaceChildren(cardHead(f), el("p", { class: "note", text: "loading…" }));
    let data;
    try {
      data = await cardData(f);
    } catch (e) {
      card.replaceChildren(cardHead(f), el("p", { class: "error", text: "cannot decode this card: " + e }));
      return;
    }
    if (state.open !== f) return;  // another card was opened meanwhile
    card.replaceChildren(cardHead(f), ...(data ? cards.body(data, DATA.max[f] || 1) : [el("p", { class: "note", text: "No card for this feature in this report." })]));
    card.scrollTop = 0;
  }
  function cardHead(f) {
    const stat = (label, x) => el("span", {}, label + " ", el("b", { text: fmt(x) }));
    const parts = [stat("density", DATA.density[f]), stat("max act", DATA.max[f]), stat("mean act", DATA.mean[f])];
    // The extra columns (contrast scores ...) follow the five built-in ones.
    for (const col of INDEX.columns.slice(5)) parts.push(stat(col.label, DATA[col.key][f]));
    return el("div", {}, el("h2", { text: "Feature " + f }), el("div", { class: "stats" }, ...parts));
  }
  // ---- wiring -----------------------------------------------------------------------------
  buildHeader();
  $("filter").addEventListener("input", (e) => { state.query = e.target.value; recompute(); });
  $("page-size").addEventListener("change", (e) => { state.size = Number(e.target.value); state.page = 0; renderIndex(); });
  $("prev").addEventListener("click", () => { state.page--; renderIndex(); });
  $("next").addEventListener("click", () => { state.page++; renderIndex(); });
  window.addEventListener("hashchange", fromHash);
  state.size = Number($("page-size").value);
  recompute();
  fromHash();
})();
