// softsae dashboard: draws the JSON of the page's #dashboard-data element. No dependencies.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("dashboard-data").textContent);
  const S = DATA.summary, META = DATA.meta, TOK = DATA.tokens, CARDS = DATA.latents, VIEW = DATA.view;
  const byId = new Map(CARDS.map((c, i) => [c.id, i]));
  const SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function fmt(x, d) {
    if (x === null || x === undefined) return "n/a";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x) && Math.abs(x) < 1e15) return x.toLocaleString("en-US");
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    if (a >= 1000) return x.toLocaleString("en-US", {maximumFractionDigits: 0});
    // at most `d` decimals (default 3) and at most 4 significant digits
    const dec = Math.min(d === undefined ? 3 : d, Math.max(0, 3 - Math.floor(Math.log10(a || 1))));
    return x.toFixed(dec);
  }
  function pct(x) { return x === null || x === undefined ? "n/a" : (100 * x).toPrecision(3) + "%"; }
  // printable token text: newlines and tabs made visible, empty -> a placeholder
  function tokText(id) {
    const s = TOK[String(id)];
    if (s === undefined) return "\u27e8" + id + "\u27e9";
    const t = s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, "")
      .replace(/ {3,}/g, m => " \u2423\u00d7" + m.length + " ");  // indentation runs: "␣×12", not 12 blanks
    return t.length ? t : "\u2205";
  }
  function shade(rgb, a) { return "rgba(" + rgb + "," + Math.max(0, Math.min(1, a)).toFixed(3) + ")"; }

  // ------------------------------------------------------------------ charts
  function barChart(counts, opts) {
    // counts: array; opts: {labels(i) -> string for ticks, cls(i) -> extra class, title(i, c) -> tooltip}
    const W = 400, H = opts.height || 120, pad = 16, n = Math.max(counts.length, 1);
    const max = Math.max(1, ...counts);
    const s = svg("svg", {class: "chart", viewBox: "0 0 " + W + " " + (H + pad), preserveAspectRatio: "none"});
    const bw = W / n;
    counts.forEach((c, i) => {
      const h = c > 0 ? Math.max(1, (opts.log ? Math.log1p(c) / Math.log1p(max) : c / max) * (H - 4)) : 0;
      const r = svg("rect", {class: "bar" + (opts.cls ? " " + opts.cls(i) : ""), x: (i * bw + 0.5).toFixed(2),
                             y: (H - h).toFixed(2), width: Math.max(0.5, bw - 1).toFixed(2), height: h.toFixed(2)});
      const t = svg("title", {});
      t.textContent = opts.title ? opts.title(i, c) : String(c);
      r.append(t);
      s.append(r);
    });
    s.append(svg("line", {class: "axis", x1: 0, y1: H + 0.5, x2: W, y2: H + 0.5}));
    const ticks = opts.ticks || [0, Math.floor((n - 1) / 2), n - 1];
    for (const i of ticks) {
      const tx = svg("text", {x: Math.min(W - 2, Math.max(2, (i + 0.5) * bw)), y: H + 12,
                              "text-anchor": i === 0 ? "start" : (i === n - 1 ? "end" : "middle")});
      tx.textContent = opts.labels ? opts.labels(i) : String(i);
      s.append(tx);
    }
    return s;
  }

  // ------------------------------------------------------------------ header and summary
  function renderHeader() {
    const m = META;
    const parts = [["SAE", m.model], ["arch", m.arch + " (d=" + m.d + ", n=" + m.n + ", k=" + m.k + ")"],
                   ["LM", m.lm + " @ " + m.layer], ["text", m.text], ["tokens", fmt(S.tokens)],
                   ["built", m.generated + " in " + fmt(m.seconds, 0) + " s"]];
    const meta = document.getElementById("meta");
    for (const [k, v] of parts) meta.append(el("span", {}, el("b", {text: k + " "}), String(v)));
  }

  function renderSummary() {
    const root = document.getElementById("summary-body");
    const rows = [["tokens", fmt(S.tokens)], ["FVU", fmt(S.fvu, 4)], ["cosine(x, x\u0302)", fmt(S.cosine, 4)],
                  ["MSE", fmt(S.mse, 4)], ["mean L0", fmt(S.l0_mean, 2)],
                  ["dead latents", fmt(S.dead) + " of " + fmt(S.dict_size) + " (" + pct(S.dead_fraction) + ")"]];
    if (S.k_hat) rows.push(["k\u0302 mean \u00b1 std", fmt(S.k_hat.mean, 2) + " \u00b1 " + fmt(S.k_hat.std, 2)]);
    if (S.corr) {
      rows.push(["Spearman(" + S.corr.measure + ", surprisal)", fmt(S.corr.spearman_surprisal, 3)]);
      rows.push(["Spearman(" + S.corr.measure + ", next-token surprisal)", fmt(S.corr.spearman_next_surprisal, 3)]);
    }
    const table = el("table", {class: "stats", id: "summary-table"});
    for (const [k, v] of rows) table.append(el("tr", {}, el("td", {text: k}), el("td", {text: v})));
    const note = el("div", {class: "note"});
    if (S.corr) note.append(el("div", {text: "rank correlations over " + fmt(S.corr.tokens) +
      " tokens sampled uniformly from the text (surprisal of the token itself / of the next token, nats)"}));
    root.append(el("div", {class: "panel text"}, el("h4", {text: "Reconstruction and sparsity"}), table, note));
    // the language model with the SAE spliced in (softsae.lm_eval's keys get readable names)
    const names = {ce_loss_clean: "CE loss, clean", ce_loss_sae: "CE loss, SAE spliced in",
                   ce_loss_increase: "CE loss increase", ce_loss_zero: "CE loss, zero ablation",
                   ce_loss_mean: "CE loss, mean ablation", frac_recovered_zero: "CE recovered vs zero ablation",
                   frac_recovered_mean: "CE recovered vs mean ablation", kl_mean: "KL(clean \u2016 SAE), mean",
                   kl_p50: "KL, median", kl_p95: "KL, 95th percentile", kl_zero: "KL(clean \u2016 zero ablation)",
                   kl_mean_ablation: "KL(clean \u2016 mean ablation)", seq_len: "window length", l0_mean: "mean L0 (scored tokens)",
                   k_hat_mean: "mean k\u0302 (scored tokens)", tokens: "tokens scored"};
    // softsae eval's "information.<k_hat|l0>.<measure>": Spearman correlations over the scored tokens
    const infoName = k => {
      const m = /^information\.(k_hat|l0)\.(\w+)$/.exec(k);
      return m ? "Spearman(" + (m[1] === "k_hat" ? "k\u0302" : "L0") + ", " + m[2] + ")" : k;
    };
    const lm = S.lm_metrics;
    const lmTable = el("table", {class: "stats", id: "lm-table"});
    if (lm) {
      for (const [k, v] of Object.entries(lm)) {
        if (typeof v === "number" || v === null)
          lmTable.append(el("tr", {}, el("td", {text: names[k] || infoName(k)}), el("td", {text: fmt(v, 4)})));
      }
    }
    root.append(el("div", {class: "panel text"}, el("h4", {text: "Language model with the SAE"}), lmTable,
      el("div", {class: "note", text: S.lm_metrics_note || ""})));

    const l0 = S.l0_hist;
    root.append(el("div", {class: "panel"}, el("h4", {text: "L0 per token (histogram)"}),
      barChart(l0, {labels: i => String(i), title: (i, c) => "L0 = " + i + ": " + c + " tokens"})));
    if (S.k_hat) {
      const kb = S.k_hat.counts, w = S.k_hat.hi / kb.length;
      root.append(el("div", {class: "panel"}, el("h4", {text: "k\u0302 per token (histogram)"}),
        barChart(kb, {labels: i => fmt(i === kb.length - 1 ? S.k_hat.hi : i * w, 1),
                      ticks: [0, Math.floor(kb.length / 2), kb.length - 1],
                      title: (i, c) => "k\u0302 in [" + fmt(i * w, 2) + ", " + fmt((i + 1) * w, 2) + "): " + c})));
    }
    const dh = S.density_hist, dc = [S.dead].concat(dh.counts);
    root.append(el("div", {class: "panel"}, el("h4", {text: "latent firing frequency (log10, dead in red)"}),
      barChart(dc, {log: false, cls: i => (i === 0 ? "dead" : ""),
                    labels: i => (i === 0 ? "dead" : fmt(dh.lo + (i - 1) * dh.step, 1)),
                    ticks: [0, Math.floor(dc.length / 2), dc.length - 1],
                    title: (i, c) => i === 0 ? c + " dead latents" :
                      "10^" + fmt(dh.lo + (i - 1) * dh.step, 2) + "..: " + c + " latents"})));
  }

  // ------------------------------------------------------------------ explanation-length view
  let pinned = null;
  function renderView() {
    const grid = document.getElementById("view-grid");
    const hasS = VIEW.some(t => t.s !== null && t.s !== undefined);
    const measure = S.k_hat ? "k" : "l0";
    const mname = S.k_hat ? "k\u0302 (predicted explanation length)" : "L0 (active latents)";
    // colour scales: the 2nd to 98th percentile of the values shown (a constant measure gets a mid shade)
    function range(vals) {
      const v = vals.filter(x => typeof x === "number").sort((a, b) => a - b);
      if (!v.length) return [0, 1];
      const lo = v[Math.floor(0.02 * (v.length - 1))], hi = v[Math.ceil(0.98 * (v.length - 1))];
      return hi > lo ? [lo, hi] : [lo - 1, hi + 1];
    }
    const [mLo, mHi] = range(VIEW.map(t => t[measure]));
    const [sLo, sHi] = range(VIEW.map(t => t.s));
    function panel(title, value, hi, lo, rgb, idp) {
      const p = el("div", {class: "panel"}, el("h4", {text: title}));
      p.append(el("div", {class: "legend"}, String(fmt(lo, 1)),
        el("span", {class: "grad", style: "background: linear-gradient(90deg, " + shade(rgb, 0) + ", " +
          shade(rgb, 0.85) + ")"}), String(fmt(hi, 1))));
      const box = el("div", {class: "tokens", id: idp});
      let doc = null;
      VIEW.forEach((t, i) => {
        if (doc !== null && t.doc !== doc) box.append(el("span", {class: "doc-break"}));
        doc = t.doc;
        const v = value(t);
        const sp = el("span", {class: "tok" + (t.lat === undefined ? " special" : ""), "data-i": i, text: tokText(t.id)});
        if (typeof v === "number") sp.style.background = shade(rgb, 0.08 + 0.77 * (v - lo) / (hi - lo));
        box.append(sp);
      });
      p.append(box);
      return p;
    }
    grid.append(panel(mname, t => t[measure], mHi, mLo, "47,95,179", "view-k"));
    if (hasS) grid.append(panel("LM surprisal of each token, \u2212ln p (nats)", t => t.s, sHi, sLo, "214,69,47",
                                "view-s"));
    else grid.classList.add("single");
    const detail = el("div", {class: "panel", id: "token-detail"},
      el("div", {class: "note", text: "Hover a token for its active latents; click to pin."}));
    grid.append(detail);
    document.getElementById("view-note").textContent = "First " + VIEW.length + " tokens of the text; " +
      (S.k_hat ? "shade = k\u0302, the SoftSAE's budget for the token (its L0 is floor(k\u0302))" :
       "shade = the number of active latents") + (hasS ? "; right: the causal LM's surprisal of the same token." :
       "; no causal LM, so no surprisal.") + " Grey tokens (BOS, special) are not read by the SAE.";
    function show(i) {
      const t = VIEW[i];
      detail.replaceChildren();
      detail.append(el("h3", {}, el("span", {class: "tok", text: tokText(t.id)})));
      const tab = el("table", {class: "stats"});
      const add = (k, v) => tab.append(el("tr", {}, el("td", {text: k}), el("td", {text: v})));
      add("position", String(i));
      if (t.k !== undefined && t.k !== null) add("k\u0302", fmt(t.k, 2));
      if (t.l0 !== undefined) add("L0", String(t.l0));
      if (t.s !== null && t.s !== undefined) add("surprisal", fmt(t.s, 2) + " nats");
      detail.append(tab);
      if (t.lat === undefined) { detail.append(el("div", {class: "note", text: "not read by the SAE"})); return; }
      detail.append(el("h4", {text: "active latents (activation)" + (t.lat.length < t.l0 ? ", largest " +
        t.lat.length + " of " + t.l0 : "")}));
      const list = el("div", {class: "lat-list"});
      for (const [id, a] of t.lat) list.append(el("div", {}, latLink(id), " " + fmt(a, 3)));
      detail.append(list);
    }
    function mark(i) {
      for (const e of document.querySelectorAll("#view-grid .tok.sel")) e.classList.remove("sel");
      if (i === null) return;
      for (const e of document.querySelectorAll('#view-grid .tok[data-i="' + i + '"]')) e.classList.add("sel");
    }
    grid.addEventListener("mouseover", ev => {
      const t = ev.target.closest(".tok[data-i]");
      if (!t || pinned !== null) return;
      const i = Number(t.dataset.i);
      show(i); mark(i);
    });
    grid.addEventListener("click", ev => {
      const t = ev.target.closest(".tok[data-i]");
      if (!t) return;
      const i = Number(t.dataset.i);
      pinned = pinned === i ? null : i;
      show(i); mark(pinned === null ? i : pinned);
    });
  }

  // ------------------------------------------------------------------ latent cards
  const state = {page: 0, size: 24, sort: "count", filter: ""};
  function latLink(id) {
    const a = el("a", {class: "lat", text: "#" + id, title: byId.has(id) ? "go to the card of latent " + id :
      "latent " + id + " has no card on this page"});
    a.addEventListener("click", ev => { ev.preventDefault(); goTo(id); });
    return a;
  }
  function context(ctx, max, label) {
    const line = el("span", {class: "line"});
    ctx.t.forEach((id, j) => {
      const a = ctx.a[j] || 0;
      const sp = el("span", {class: "tok" + (j === ctx.c ? " center" : ""), text: tokText(id),
                             title: "activation " + fmt(a, 3)});
      if (a > 0) sp.style.background = shade("242,140,40", 0.1 + 0.8 * a / Math.max(max, 1e-9));
      line.append(sp);
    });
    return el("div", {class: "ctx"}, el("span", {class: "val", text: label}), line);
  }
  function card(c) {
    const max = c.max || 1e-9;
    const root = el("div", {class: "latent-card", id: "latent-" + c.id, "data-latent": c.id});
    root.append(el("div", {class: "head"}, el("h3", {text: "Latent " + c.id}),
      el("span", {class: "figures", text: "fires on " + pct(c.density) + " of tokens (" + fmt(c.count) + ")"})));
    root.append(el("div", {class: "figures", text: "max " + fmt(c.max) + " \u00b7 mean " + fmt(c.mean) +
      " \u00b7 decoder norm " + fmt(c.dec_norm)}));
    const cols = el("div", {class: "cols"});
    const h = c.hist, nb = h.counts.length, w = h.hi / nb;
    cols.append(el("div", {}, el("h4", {text: "activation histogram"}),
      barChart(h.counts, {height: 64, labels: i => fmt(i === nb - 1 ? h.hi : i * w, 2),
                          title: (i, k) => "[" + fmt(i * w, 3) + ", " + fmt((i + 1) * w, 3) + "): " + k})));
    const nbx = el("div", {class: "neigh"}, el("h4", {text: "nearest latents (decoder cosine)"}));
    for (const [id, cs] of c.neighbours) nbx.append(el("span", {class: "chip"}, latLink(id), " " + fmt(cs, 2)));
    cols.append(nbx);
    root.append(cols);
    if (c.promoted) {
      const lens = el("div", {class: "cols lens"});
      const col = (title, list, cls) => {
        const d = el("div", {}, el("h4", {text: title}));
        for (const [id, v] of list) d.append(el("span", {class: "chip " + cls, title: fmt(v, 3), text: tokText(id)}));
        return d;
      };
      lens.append(col("promoted tokens (logit lens)", c.promoted, "up"),
                  col("suppressed tokens", c.suppressed, "down"));
      root.append(lens);
    }
    root.append(el("h4", {text: "top activations"}));
    const top = el("div", {class: "top-contexts"});
    for (const x of c.top) top.append(context(x, max, fmt(x.v, 3)));
    root.append(top);
    if (c.samples.length) {
      root.append(el("h4", {text: "activation quantile samples (q = quantile among its firings)"}));
      const sm = el("div", {class: "quantile-samples"});
      for (const x of c.samples) sm.append(context(x, max, "q" + Math.round(100 * x.q) + " " + fmt(x.v, 2)));
      root.append(sm);
    }
    return root;
  }
  function ordered() {
    let list = CARDS.slice();
    const f = state.filter.trim();
    if (f) {
      const ids = new Set(f.split(/[\s,]+/).filter(Boolean).map(Number));
      list = list.filter(c => ids.has(c.id));
    }
    const key = {count: c => -c.count, max: c => -(c.max || 0), id: c => c.id, "given": c => 0}[state.sort];
    if (state.sort !== "given") list.sort((a, b) => key(a) - key(b) || a.id - b.id);
    return list;
  }
  function renderCards() {
    const list = ordered();
    const pages = Math.max(1, Math.ceil(list.length / state.size));
    state.page = Math.min(state.page, pages - 1);
    const box = document.getElementById("cards");
    box.replaceChildren(...list.slice(state.page * state.size, (state.page + 1) * state.size).map(card));
    for (const p of document.querySelectorAll(".page-info"))
      p.textContent = "page " + (state.page + 1) + " of " + pages + " (" + list.length + " latents)";
  }
  function goTo(id) {
    if (!byId.has(id)) return;
    state.filter = ""; document.getElementById("filter").value = "";
    const list = ordered();
    const k = list.findIndex(c => c.id === id);
    state.page = Math.floor(k / state.size);
    renderCards();
    const e = document.getElementById("latent-" + id);
    e.scrollIntoView({block: "start"});
    e.classList.add("flash");
    setTimeout(() => e.classList.remove("flash"), 1500);
  }
  function renderControls() {
    const filter = document.getElementById("filter"), sort = document.getElementById("sort");
    const size = document.getElementById("page-size");
    if (META.order === "given") { state.sort = "given"; sort.value = "given"; }
    filter.addEventListener("input", () => { state.filter = filter.value; state.page = 0; renderCards(); });
    sort.addEventListener("change", () => { state.sort = sort.value; state.page = 0; renderCards(); });
    size.addEventListener("change", () => { state.size = Number(size.value); state.page = 0; renderCards(); });
    for (const b of document.querySelectorAll(".prev")) b.addEventListener("click", () => {
      if (state.page > 0) { state.page--; renderCards(); } });
    for (const b of document.querySelectorAll(".next")) b.addEventListener("click", () => {
      state.page++; renderCards(); });
    document.getElementById("cards-note").textContent = CARDS.length + " latents: " + (META.order === "given" ?
      "the ids asked for" : "the most frequent on this text") + ". Token shade = the latent's activation " +
      "(outlined: the token the value belongs to). Contexts: " + META.ctx + ".";
  }

  renderHeader();
  renderSummary();
  renderView();
  renderControls();
  renderCards();
  document.body.dataset.rendered = "ok";
})();
