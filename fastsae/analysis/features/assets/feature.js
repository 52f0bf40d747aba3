// One feature's page: feature.html#<latent>. Its data come lazily from the shard that holds it.
"use strict";
(function () {
  const F = window.fastsae, M = F.meta;
  const PALETTE = ["#e6550d", "#3182bd", "#31a354", "#756bb1", "#d6616b", "#bdbdbd"];
  const $ = id => document.getElementById(id);
  let current = null;

  function latentFromHash() {
    const n = Number(location.hash.slice(1));
    return Number.isInteger(n) && n >= 0 && n < M.d_sae && location.hash.length > 1 ? n : null;
  }

  function route() {
    const latent = latentFromHash();
    $("error").textContent = "";
    if (latent === null) { $("error").textContent = `no latent ${location.hash.slice(1)}: expected feature.html#0 … #${M.d_sae - 1}`; return; }
    F.load(F.shardName(latent), () => render(latent), msg => { $("error").textContent = msg; });
  }

  function render(latent) {
    const f = F.shards[Math.floor(latent / M.shard_size)][latent];
    current = { latent, f };
    document.title = `latent ${latent} · fastsae`;
    $("title").textContent = `Latent ${latent}`;
    $("feature").dataset.latent = String(latent);
    $("prev-latent").href = "#" + Math.max(latent - 1, 0);
    $("next-latent").href = "#" + Math.min(latent + 1, M.d_sae - 1);
    $("stats").textContent = `fires on ${f.c.toLocaleString()} of ${M.tokens.toLocaleString()} tokens ` +
      `(density ${F.fmt(f.c / M.tokens)}) · mean activation ${F.fmt(f.mean)} · max ${F.fmt(f.max)} · ${M.model || ""} ${M.site || ""}`;
    annotations(f);
    histogram(f);
    logits(f);
    logitHistogram(f);
    neighbours(f);
    contexts(f.top, $("contexts"), f, true);
    contexts(f.smp, $("samples"), f, false);
    // for tests and the benchmark: when the page (dead latents included) finished its first render
    if (!document.body.dataset.readyMs) document.body.dataset.readyMs = String(Math.round(performance.now()));
  }

  function annotations(f) {
    const box = $("annotations");
    box.replaceChildren();
    for (const a of f.ann || []) {
      const sec = F.el("section", { class: "annotation" });
      sec.appendChild(F.el("h3", {}, a.title));
      sec.appendChild(F.el("p", {}, a.text || ""));
      for (const link of a.links || []) {
        const href = link && link.href, text = String((link && link.text) || href || link);
        const safe = F.linkHref(href);  // only http:, https: and relative links are live; the rest is text
        const why = "not linked (only http:, https: and relative links are): " + String(href);
        sec.appendChild(safe !== null ? F.el("a", { href: safe }, text) : F.el("span", { class: "unlinked", title: why }, text));
        sec.appendChild(document.createTextNode(" "));
      }
      box.appendChild(sec);
    }
  }

  function histogram(f) {
    const box = $("histogram"), legend = $("legend");
    box.replaceChildren(); legend.replaceChildren();
    if (!f.h.length) { box.textContent = "never fired"; return; }
    const W = 470, H = 170, padL = 40, padB = 22, n = f.h.length, bw = (W - padL) / n;
    const log = $("logscale").checked, scale = v => (log ? Math.log10(1 + v) : v);
    const top = Math.max(...f.h.map(scale)) || 1;
    const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("id", "histogram-svg");
    const binWidth = Math.pow(2, f.he) / M.bins;
    const split = f.hs && f.hs.t.length ? f.hs : null;
    f.h.forEach((count, b) => {
      const height = (H - padB) * scale(count) / top, x = padL + b * bw;
      const bar = document.createElementNS(ns, "g");
      bar.setAttribute("class", "bar"); bar.setAttribute("data-count", count);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${F.fmt(b * binWidth)} – ${F.fmt((b + 1) * binWidth)}: ${count.toLocaleString()} tokens`;
      bar.appendChild(title);
      // stacked by token: each top token's share of this bin in the uniform sample of firing tokens
      const parts = [];
      let rest = 1;
      if (split && split.n[b] > 0) split.t.forEach((_, k) => { const s = split.c[k][b] / split.n[b]; parts.push(s); rest -= s; });
      parts.push(Math.max(rest, 0));
      let y = H - padB;
      parts.forEach((share, k) => {
        if (share <= 0) return;
        const h = height * share, r = document.createElementNS(ns, "rect");
        r.setAttribute("x", x); r.setAttribute("width", Math.max(bw - 1, 1)); r.setAttribute("y", y - h); r.setAttribute("height", h);
        r.setAttribute("fill", k < parts.length - 1 ? PALETTE[k] : PALETTE[PALETTE.length - 1]);
        r.setAttribute("class", "seg");
        bar.appendChild(r);
        y -= h;
      });
      svg.appendChild(bar);
    });
    const label = (x, y, text, anchor) => {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor); t.textContent = text;
      svg.appendChild(t);
    };
    label(padL, H - 6, "0", "start");
    label(W, H - 6, F.fmt(n * binWidth), "end");
    label(padL - 4, 10, (log ? "log " : "") + Math.max(...f.h).toLocaleString(), "end");
    box.appendChild(svg);
    if (split) {
      split.t.forEach((id, k) => {
        const item = F.el("span", { class: "legend-item" });
        item.appendChild(F.el("span", { class: "swatch", style: `background:${PALETTE[k]}` }));
        item.appendChild(document.createTextNode(JSON.stringify(F.show(F.token(id)))));
        legend.appendChild(item);
      });
      const other = F.el("span", { class: "legend-item" });
      other.appendChild(F.el("span", { class: "swatch", style: `background:${PALETTE[PALETTE.length - 1]}` }));
      other.appendChild(document.createTextNode(`other tokens (split from a sample of ${split.total} firing tokens)`));
      legend.appendChild(other);
    }
  }

  function logits(f) {
    for (const [id, list] of [["promoted", f.lp], ["suppressed", f.ln]]) {
      const ol = $(id);
      ol.replaceChildren();
      if (!list) { ol.appendChild(F.el("li", { class: "muted" }, "not computed")); continue; }
      for (const [tok, v, z] of list) {
        const li = F.el("li", { "data-token": tok, title: `logit change ${F.fmt(v)} at unit final-norm scale` });
        li.appendChild(F.el("span", { class: "tokens" }, JSON.stringify(F.show(F.token(tok)))));
        const shown = z === null ? F.fmt(v) : F.fmt(z, 2) + "\u03C3";
        li.appendChild(F.el("span", { class: "val" }, ((z === null ? v : z) > 0 ? "+" : "") + shown));
        ol.appendChild(li);
      }
    }
  }

  // The histogram of the latent's logit changes over the vocabulary when it is ablated (f.lh: counts in equal
  // bins from lo to hi): drops left of 0 in red, rises in blue, the bin holding 0 grey.
  function logitHistogram(f) {
    const box = $("logit-hist");
    box.replaceChildren();
    if (!f.lh || !f.lh.c.length) { box.appendChild(F.el("p", { class: "muted" }, "not computed")); return; }
    const { c, lo, hi } = f.lh, n = c.length, step = (hi - lo) / n;
    const W = 360, H = 190, padL = 46, padR = 8, padT = 8, padB = 34, plotH = H - padT - padB, bw = (W - padL - padR) / n;
    const log = $("logit-logscale").checked, scale = v => (log ? Math.log10(1 + v) : v);
    const top = Math.max(...c.map(scale)) || 1;
    const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    const add = (parent, tag, attrs, text) => {
      const e = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      parent.appendChild(e);
      return e;
    };
    svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("id", "logit-hist-svg");
    c.forEach((count, b) => {
      const h = plotH * scale(count) / top, left = lo + b * step, right = left + step;
      const fill = right <= 0 ? "#d6616b" : left >= 0 ? "#3182bd" : "#999";
      const bar = add(svg, "rect", { class: "lbar", "data-count": count, x: padL + b * bw, width: Math.max(bw - 1, 1),
                                     y: padT + plotH - h, height: h, fill });
      add(bar, "title", {}, `${F.fmt(left)} – ${F.fmt(right)}: ${count.toLocaleString()} tokens`);
    });
    add(svg, "line", { x1: padL, x2: W - padR, y1: padT + plotH, y2: padT + plotH, stroke: "#999" });
    add(svg, "line", { x1: padL, x2: padL, y1: padT, y2: padT + plotH, stroke: "#999" });
    const xAt = v => padL + (v - lo) / (hi - lo || 1) * (W - padL - padR);
    const ticks = [[lo, "start"], [hi, "end"]];
    if (lo < 0 && hi > 0) ticks.push([0, "middle"]);
    for (const [v, anchor] of ticks) add(svg, "text", { class: "tick", x: xAt(v), y: padT + plotH + 12, "text-anchor": anchor }, F.fmt(v));
    add(svg, "text", { class: "axis-label", x: padL + (W - padL - padR) / 2, y: H - 4, "text-anchor": "middle" },
        "logit change when ablated");
    add(svg, "text", { class: "tick", x: padL - 4, y: padT + 8, "text-anchor": "end" }, (log ? "log " : "") + Math.max(...c).toLocaleString());
    add(svg, "text", { class: "tick", x: padL - 4, y: padT + plotH, "text-anchor": "end" }, "0");
    add(svg, "text", { class: "axis-label", x: 12, y: padT + plotH / 2, "text-anchor": "middle",
                       transform: `rotate(-90 12 ${padT + plotH / 2})` }, "vocabulary tokens");
    box.appendChild(svg);
  }

  function neighbours(f) {
    const ol = $("neighbours");
    ol.replaceChildren();
    for (const [id, cos] of f.nb || []) {
      const li = F.el("li");
      li.appendChild(F.el("a", { href: "#" + id, class: "neighbour" }, String(id)));
      li.appendChild(F.el("span", { class: "muted" }, "  cos " + F.fmt(cos, 2)));
      ol.appendChild(li);
    }
  }

  function colour(mode, v, scale) {
    if (v === null || v === undefined || Number.isNaN(v) || v === 0) return "";
    if (mode === "act") return `rgba(255,140,0,${Math.min(v / scale, 1).toFixed(3)})`;
    const a = Math.min(Math.abs(v) / scale, 1).toFixed(3);
    return v < 0 ? `rgba(220,40,40,${a})` : `rgba(40,90,220,${a})`;
  }

  function contexts(list, box, f, isTop) {
    box.replaceChildren();
    if (!list.length) { box.appendChild(F.el("p", { class: "muted" }, "none")); return; }
    const mode = isTop ? $("mode").value : "act";
    const key = { act: "a", ablation: "ab", attribution: "at" }[mode];
    let scale = f.max || 1;
    if (mode !== "act") {
      scale = 1e-6;
      for (const c of list) for (const v of c[key] || []) if (v !== null && !Number.isNaN(v)) scale = Math.max(scale, Math.abs(v));
    }
    list.forEach((c, r) => {
      const div = F.el("div", { class: "context tokens", "data-rank": r });
      div.appendChild(F.el("span", { class: "meta" }, isTop ? `#${r + 1} ${F.fmt(c.a[c.p - c.b])}` : `q${c.q} ${F.fmt(c.a[c.p - c.b])}`));
      if (isTop && mode !== "act" && !c[key]) div.appendChild(F.el("span", { class: "meta" }, "(not measured)"));
      c.t.forEach((id, i) => {
        const span = F.el("span", { class: "tok" + (id < 0 ? " unknown" : "") + (c.b + i === c.p ? " peak" : ""), "data-act": c.a[i] },
                          F.show(F.token(id)));
        const values = [`activation ${F.fmt(c.a[i])}`];
        if (c.ab && i < c.ab.length) values.push(`Δ log p(this token) without the feature ${F.fmt(c.ab[i])}`);
        if (c.at && i < c.at.length && c.at[i] !== null && !Number.isNaN(c.at[i])) values.push(`feature change at the peak if removed ${F.fmt(c.at[i])}`);
        span.title = `${JSON.stringify(F.token(id))} · ${values.join(" · ")}`;
        const bg = colour(mode, c[key] ? c[key][i] : null, scale);
        if (bg) span.style.background = bg;
        div.appendChild(span);
      });
      box.appendChild(div);
    });
  }

  $("mode").addEventListener("change", () => current && contexts(current.f.top, $("contexts"), current.f, true));
  $("logscale").addEventListener("change", () => current && histogram(current.f));
  $("logit-logscale").addEventListener("change", () => current && logitHistogram(current.f));
  $("goto").addEventListener("change", e => { location.hash = "#" + e.target.value; });
  window.addEventListener("hashchange", route);
  route();
})();
