// The index: every latent in one table, filtered by search, sorted by a column, shown a page at a time.
"use strict";
(function () {
  const F = window.fastsae, M = F.meta, I = F.index, N = M.d_sae, PAGE = 100;
  document.getElementById("title").textContent = `${N.toLocaleString()} features`;
  document.getElementById("subtitle").textContent =
    `${M.model || "model"} · ${M.site || "site"} · ${M.tokens.toLocaleString()} tokens read`;
  const density = Float64Array.from(I.count, c => c / M.tokens);
  const columns = { id: i => i, density: i => density[i], max: i => I.max[i], mean: i => I.mean[i],
                    score: i => (I.score[i] === null ? -1 : I.score[i]) };
  const lowerTokens = I.tokens.map(t => t.toLowerCase());
  let rows = Array.from({ length: N }, (_, i) => i), shown = rows, page = 0, sortKey = "id", descending = false;

  function sort() {
    const get = columns[sortKey], sign = descending ? -1 : 1;
    shown.sort((a, b) => sign * (get(a) - get(b)) || a - b);
    for (const th of document.querySelectorAll("th[data-sort]")) {
      th.classList.toggle("sorted-desc", th.dataset.sort === sortKey && descending);
      th.classList.toggle("sorted-asc", th.dataset.sort === sortKey && !descending);
    }
  }

  function render() {
    const body = document.querySelector("#features tbody");
    body.replaceChildren();
    const first = page * PAGE;
    for (const i of shown.slice(first, first + PAGE)) {
      const tr = F.el("tr", { "data-latent": i });
      const link = F.el("td");
      link.appendChild(F.el("a", { href: "feature.html#" + i }, String(i)));
      tr.appendChild(link);
      tr.appendChild(F.el("td", { class: "num" }, F.fmt(density[i])));
      tr.appendChild(F.el("td", { class: "num" }, F.fmt(I.max[i])));
      tr.appendChild(F.el("td", { class: "num" }, F.fmt(I.mean[i])));
      tr.appendChild(F.el("td", { class: "num" }, I.score[i] === null ? "–" : F.fmt(I.score[i], 2)));
      tr.appendChild(F.el("td", { class: "tokens" }, I.tokens[i] ? I.tokens[i].split("\u001f").map(t => JSON.stringify(F.show(t))).join("  ") : ""));
      tr.appendChild(F.el("td", {}, I.note[i]));
      body.appendChild(tr);
    }
    const last = Math.min(first + PAGE, shown.length);
    document.getElementById("page").textContent =
      shown.length ? `${first + 1}–${last} of ${shown.length.toLocaleString()}` : "no feature matches";
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = last >= shown.length;
  }

  function filter() {
    const q = document.getElementById("search").value.trim().toLowerCase();
    if (q === "") shown = rows.slice();
    else if (/^\d+$/.test(q)) shown = Number(q) < N ? [Number(q)] : [];
    else {
      const notes = F.search ? F.search.text : null;
      shown = rows.filter(i => lowerTokens[i].includes(q) || I.note[i].toLowerCase().includes(q) ||
                               (notes && notes[i] && notes[i].toLowerCase().includes(q)));
      if (!F.search && M.has_search) F.load("search", filter);  // full annotation texts, fetched on first need
    }
    page = 0;
    sort();
    render();
  }

  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      descending = th.dataset.sort === sortKey ? !descending : th.dataset.sort !== "id";
      sortKey = th.dataset.sort;
      sort();
      page = 0;
      render();
    });
  }
  document.getElementById("search").addEventListener("input", filter);
  document.getElementById("prev").addEventListener("click", () => { page--; render(); });
  document.getElementById("next").addEventListener("click", () => { page++; render(); });
  filter();
  // milliseconds from navigation start to a rendered table, data parsing included (the bench reads it)
  document.body.dataset.readyMs = String(Math.round(performance.now()));
  document.getElementById("summary").textContent = `ready in ${document.body.dataset.readyMs} ms`;
})();
