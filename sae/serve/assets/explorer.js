// The explorer page (sae/serve/app.py serves it; its docstring lists the API). Every string
// from the model, the data or the user goes into the page as text (textContent), never as
// HTML; cards are drawn by card.js, as in the report.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const { el, shown, fmt } = SAECard;
  const TOKEN = new URLSearchParams(location.search).get("token") || "";
  const state = { info: null, sae: 0, features: null, selected: -1, generation: null };

  // ---- talking to the server --------------------------------------------------------------
  function headers(json) {
    const h = TOKEN ? { "X-SAE-Token": TOKEN } : {};
    if (json) h["Content-Type"] = "application/json";
    return h;
  }
  async function api(path, body, signal) {
    const init = body === undefined ? { headers: headers(false) }
      : { method: "POST", headers: headers(true), body: JSON.stringify(body), signal };
    const response = await fetch(path, init);
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return response;
  }
  function showError(e) {
    $("error").textContent = String(e && e.message ? e.message : e);
    $("error").hidden = false;
  }
  function clearError() { $("error").hidden = true; $("error").textContent = ""; }
  async function guarded(fn) {
    clearError();
    try { await fn(); } catch (e) { if (e.name !== "AbortError") showError(e); }
  }

  // ---- prompt -> features -------------------------------------------------------------------
  async function analyze() {
    $("busy").textContent = "running the model…";
    try {
      const r = await api("/api/features", { prompt: $("prompt").value, top: 5 });
      state.features = await r.json();
      state.selected = -1;
      drawTokens();
    } finally { $("busy").textContent = ""; }
  }
  function drawTokens() {
    const data = state.features;
    if (!data) return;
    const sae = data.saes[state.sae], max = sae.max || 1;
    const spans = data.tokens.map((text, i) => {
      const top = sae.top[i];
      const span = el("span", { class: "tok" + (i === state.selected ? " sel" : ""), "data-i": String(i) });
      span.textContent = data.special[i] ? "⟨special⟩" : shown(text);
      span.title = top.length ? top.map(([f, a]) => `feature ${f}: ${a}`).join("\n") : "no active feature";
      if (top.length) span.style.backgroundColor = `rgba(var(--hot), ${Math.min(1, top[0][1] / max).toFixed(3)})`;
      span.addEventListener("click", () => { state.selected = i; drawTokens(); });
      return span;
    });
    $("tokens").replaceChildren(...spans);
    drawTokenFeatures();
  }
  function drawTokenFeatures() {
    const i = state.selected;
    if (i < 0) { $("token-features").replaceChildren(); return; }
    const top = state.features.saes[state.sae].top[i];
    const buttons = top.map(([f, a]) => {
      const b = el("button", { class: "feature", "data-f": String(f), text: `${f} (${a})` });
      b.addEventListener("click", () => guarded(() => openCard(state.sae, f)));
      return b;
    });
    const label = el("span", { class: "note", text: `token ${i} “${shown(state.features.tokens[i])}”: ` });
    $("token-features").replaceChildren(label, ...(buttons.length ? buttons : [el("span", { text: "no active feature" })]));
  }

  // ---- feature cards -------------------------------------------------------------------------
  let cardRequest = 0;
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  // The card's data; while the SAE's statistics are first scanned (202), a progress bar
  // in the card and another ask every 400 ms, until the card is no longer wanted (null).
  async function fetchCard(sae, f, wanted, card) {
    for (;;) {
      const r = await api(`/api/card?sae=${sae}&feature=${f}`);
      const d = await r.json();
      if (r.status !== 202) return d;
      if (!wanted()) return null;
      const s = d.scanning;
      card.replaceChildren(el("h2", { text: `Feature ${f}` }),
        el("p", { class: "note", text: `scanning feature statistics (first card of this SAE): ` +
          `${s.scanned.toLocaleString()} of ${s.total.toLocaleString()} tokens` }),
        el("progress", { id: "scan-progress", max: String(s.total), value: String(s.scanned) }));
      await sleep(400);
      if (!wanted()) return null;
    }
  }
  async function openCard(sae, f) {
    const card = $("card");
    // A slower answer for an earlier click must not overwrite the card asked for last.
    const mine = ++cardRequest;
    card.setAttribute("aria-busy", "true");
    card.replaceChildren(el("h2", { text: `Feature ${f}` }), el("p", { class: "note", text: "loading…" }));
    let d;
    try {
      d = await fetchCard(sae, f, () => mine === cardRequest, card);
    } catch (e) {
      if (mine === cardRequest) {
        card.replaceChildren(el("h2", { text: `Feature ${f}` }));
        card.setAttribute("aria-busy", "false");
      }
      throw e;
    }
    if (d === null || mine !== cardRequest) return;
    const draw = SAECard.renderer({ strings: d.strings, bytes: d.bytes, edges: d.edges,
      open: (g) => guarded(() => openCard(sae, g)) });
    const stat = (label, x) => el("span", {}, label + " ", el("b", { text: fmt(x) }));
    const add = el("button", { text: "Add to edits" });
    add.addEventListener("click", () => addEdit({ sae, feature: f, kind: "ablate", value: 0 }));
    card.replaceChildren(
      el("h2", { text: `Feature ${f}` }),
      el("div", { class: "stats" }, stat("density", d.stats.density.toPrecision(3)),
        stat("max act", d.stats.max.toPrecision(3)), stat("mean act", d.stats.mean.toPrecision(3)), add),
      ...draw.body(d.card, d.stats.max || 1));
    card.scrollTop = 0;
    card.setAttribute("aria-busy", "false");
  }

  // ---- search ---------------------------------------------------------------------------------
  // A contrast list from a file, read by the server as the CLI reads one (.txt or .jsonl);
  // kept as a list (a .jsonl prompt may hold line breaks) until its text box is edited.
  const uploaded = { a: null, b: null };
  async function loadPromptFile(side) {
    const input = $(`file-${side}`), file = input.files[0];
    if (!file) return;
    input.value = "";  // choosing the same file again still loads it
    const d = await (await api("/api/prompts", { name: file.name, text: await file.text() })).json();
    uploaded[side] = d.prompts;
    $(`contrast-${side}`).value = d.prompts.join("\n");
    $(`file-${side}-note`).textContent = `${d.prompts.length} prompts from ${file.name}`;
  }
  async function search(kind, body, label) {
    $("search-results").replaceChildren(el("p", { class: "note", text: "searching…" }));
    const d = await (await api("/api/search/" + kind, { sae: state.sae, top: 20, ...body })).json();
    const buttons = d.ranking.map(([f, v]) => {
      const b = el("button", { class: "feature", "data-f": String(f), text: `${f} (${v})` });
      b.addEventListener("click", () => guarded(() => openCard(state.sae, f)));
      return b;
    });
    $("search-results").replaceChildren(el("span", { class: "note", text: label + ": " }),
      ...(buttons.length ? buttons : [el("span", { text: "none" })]));
  }

  // ---- edits -----------------------------------------------------------------------------------
  function addEdit(edit) {
    const row = el("tr", { class: "edit" });
    const sae = el("select", { class: "sae" }, ...state.info.saes.map((s) => el("option", { value: String(s.index), text: s.hook })));
    sae.value = String(edit.sae);
    const feature = el("input", { class: "feature", type: "number", min: "0", step: "1", value: String(edit.feature) });
    const kind = el("select", { class: "kind" }, ...["ablate", "clamp", "scale", "steer"].map((k) => el("option", { value: k, text: k })));
    kind.value = edit.kind;
    const value = el("input", { class: "value", type: "number", step: "any", value: String(edit.value) });
    const slider = el("input", { type: "range", min: "-20", max: "20", step: "0.5", value: String(edit.value) });
    slider.addEventListener("input", () => { value.value = slider.value; });
    value.addEventListener("input", () => { slider.value = value.value; });
    const remove = el("button", { text: "✕", title: "remove" });
    remove.addEventListener("click", () => row.remove());
    row.append(el("td", {}, sae), el("td", {}, feature), el("td", {}, kind), el("td", {}, value, slider), el("td", {}, remove));
    document.querySelector("#edits tbody").append(row);
  }
  // The page's values as typed: the server checks them and names a bad one.
  const asNumber = (s) => (s.trim() === "" || isNaN(Number(s)) ? s : Number(s));
  function editList() {
    return [...document.querySelectorAll("#edits tr.edit")].map((row) => ({
      sae: Number(row.querySelector(".sae").value),
      feature: asNumber(row.querySelector(".feature").value),
      kind: row.querySelector(".kind").value,
      value: asNumber(row.querySelector(".value").value),
    }));
  }
  function request() {
    return { prompt: $("prompt").value, edits: editList(), seed: asNumber($("seed").value),
      temperature: asNumber($("temperature").value), max_new_tokens: asNumber($("max-new").value) };
  }

  // ---- generate (streamed) and stop -------------------------------------------------------------
  async function generate() {
    if (state.generation) state.generation.abort();
    const control = new AbortController();
    state.generation = control;
    $("baseline").replaceChildren(); $("edited").replaceChildren(); $("kl-note").textContent = "";
    $("stop").disabled = false; $("generate").disabled = true;
    let steps = 0, total = 0;
    try {
      const response = await api("/api/generate", request(), control.signal);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const line of lines.filter((l) => l)) {
          const step = JSON.parse(line);
          if (step.error) throw new Error(step.error);
          if (step.done) { $("kl-note").textContent = `${steps} steps; mean KL(edited ‖ unedited) ${(total / Math.max(steps, 1)).toFixed(4)} nats`; continue; }
          steps += 1; total += step.kl || 0;
          appendToken("baseline", step.baseline, null);
          appendToken("edited", step.edited, step.kl);
        }
      }
    } finally {
      if (state.generation === control) state.generation = null;
      $("stop").disabled = true; $("generate").disabled = false;
    }
  }
  function appendToken(side, text, kl) {
    if (text === null || text === undefined) return;
    const span = el("span", { class: "tok" });
    span.textContent = text;
    if (kl !== null) { span.title = `KL ${kl} nats`; span.style.setProperty("--kl", Math.min(1, kl).toFixed(3)); }
    $(side).append(span);
  }
  function stop() {
    if (state.generation) { state.generation.abort(); $("kl-note").textContent = "stopped"; }
  }

  async function exportEdits() {
    const d = await (await api("/api/export", request())).json();
    const text = [...d.commands, "", "# --edits FILE (YAML):", ...d.yaml].join("\n");
    $("exported").textContent = text;
    $("exported").hidden = false;
  }

  // ---- wiring ------------------------------------------------------------------------------------
  async function start() {
    state.info = await (await api("/api/info")).json();
    $("model").textContent = `${state.info.model} · ${state.info.saes.length} SAE(s)`;
    $("sae").replaceChildren(...state.info.saes.map((s) => el("option", { value: String(s.index), text: `${s.hook} (${s.architecture}, ${s.features} features)` })));
    $("sae").addEventListener("change", () => { state.sae = Number($("sae").value); drawTokens(); });
    $("analyze").addEventListener("click", () => guarded(analyze));
    $("add-edit").addEventListener("click", () => addEdit({ sae: state.sae, feature: 0, kind: "ablate", value: 0 }));
    $("generate").addEventListener("click", () => guarded(generate));
    $("stop").addEventListener("click", stop);
    $("export").addEventListener("click", () => guarded(exportEdits));
    $("search-text").addEventListener("click", () => guarded(() => search("text",
      { prompt: $("prompt").value, focus: $("focus").value }, "largest activation on the text")));
    $("search-token").addEventListener("click", () => guarded(() => search("token",
      { token: $("out-token").value }, "logit effect on the token")));
    for (const side of ["a", "b"]) {
      $(`file-${side}`).addEventListener("change", () => guarded(() => loadPromptFile(side)));
      $(`contrast-${side}`).addEventListener("input", () => {
        uploaded[side] = null;
        $(`file-${side}-note`).textContent = "";
      });
    }
    $("search-contrast").addEventListener("click", () => guarded(() => search("contrast",
      { a: uploaded.a || $("contrast-a").value, b: uploaded.b || $("contrast-b").value },
      "effect size (a against b)")));
    document.body.dataset.ready = "1";
  }
  guarded(start);
})();
