// The browser's data arrive as <script> files (file:// pages may not fetch JSON); each calls one setter.
"use strict";
window.fastsae = {
  meta: null, index: null, vocab: {}, shards: {}, search: null,
  setMeta(m) { this.meta = m; },
  setIndex(i) { this.index = i; },
  setVocab(v) { this.vocab = v; },
  setShard(k, s) { this.shards[k] = s; },
  setSearch(s) { this.search = s; },
  // Load data/<name>.js once; cb runs when it has arrived.
  load(name, cb, onError) {
    const id = "data-" + name;
    const existing = document.getElementById(id);
    if (existing) { if (existing.dataset.loaded) cb(); else existing.addEventListener("load", cb); return; }
    const s = document.createElement("script");
    s.id = id;
    s.src = "data/" + name + ".js";
    s.addEventListener("load", () => { s.dataset.loaded = "1"; cb(); });
    s.addEventListener("error", () => onError && onError("could not load data/" + name + ".js"));
    document.head.appendChild(s);
  },
  shardName(latent) { return "shard-" + String(Math.floor(latent / this.meta.shard_size)).padStart(5, "0"); },
  token(id) {
    if (id < 0) return "\u2205";  // a position the store left out (BOS/EOS/pad) and no windows to name it
    const t = this.vocab[id];
    return t === undefined ? "<" + id + ">" : t;
  },
  // Whitespace made visible, as in most dashboards.
  show(text) { return text.replace(/\n/g, "\u21B5").replace(/\t/g, "\u21E5"); },
  fmt(x, digits = 3) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(digits - 1);
    return Number(x.toPrecision(digits)).toString();
  },
  // href itself when it is an http:, https: or relative link, else null. Annotation files are shared
  // between researchers, so their links are untrusted: a `javascript:` link would run in this page when
  // clicked, and `data:`, `vbscript:`, `file:` … are never needed. The browser's URL parser ignores leading
  // and trailing control characters and spaces and every tab or newline (" JaVaScRiPt:", "java\tscript:"), so
  // the scheme is read the same way; an href that names a scheme only once HTML character references are
  // decoded ("&#106;avascript:") is refused too, and so is "//host/…", another host under this page's scheme
  // (file://host/… from a page opened from the file system). The browser's own parser then has the last word.
  linkHref(href) {
    if (typeof href !== "string") return null;
    const decoded = new DOMParser().parseFromString(href, "text/html").documentElement.textContent;  // inert
    for (const h of [href, decoded]) {
      const s = h.replace(/^[\u0000-\u0020]+|[\u0000-\u0020]+$/g, "").replace(/[\t\n\r]/g, "");
      const scheme = /^([a-z][a-z0-9+.\-]*):/i.exec(s);
      if (scheme ? !/^https?$/i.test(scheme[1]) : /^[\/\\]{2}/.test(s)) return null;
    }
    try {
      return /^https?:$/.test(new URL(href, "https://relative.invalid/").protocol) ? href : null;
    } catch (err) {
      return null;  // not a URL at all
    }
  },
  el(tag, attrs = {}, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  },
};
