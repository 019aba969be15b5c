// Ato Local Registry web UI: plain JS, no build step. Hash routes:
//   #/                      catalog (search via GET /v1/capsules?q=)
//   #/capsule/<pub>/<slug>  detail (versions, README, manifest, sizes, digests, runtime config)
// All page text is set with textContent, never innerHTML, so registry data cannot inject markup.
"use strict";

const TOKEN_KEY = "ato.local.registry.token";
const app = document.getElementById("app");
let wellKnown = { write_auth_required: false };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (opts.write && token()) opts.headers["authorization"] = "Bearer " + token();
  if (opts.json !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
  }
  const resp = await fetch(path, { method: opts.method || "GET", headers: opts.headers, body: opts.body });
  let body = null;
  try { body = await resp.json(); } catch (_e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.message ? body.message : resp.status + " " + resp.statusText;
    const err = new Error(msg);
    err.status = resp.status;
    err.code = body && body.error;
    throw err;
  }
  return body;
}

function size(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let v = n, i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}

function renderAuthState() {
  const pill = document.getElementById("auth-state");
  if (!wellKnown.write_auth_required) { pill.textContent = "writes open"; pill.className = "pill"; return; }
  pill.textContent = token() ? "token set" : "writes need a token";
  pill.className = "pill " + (token() ? "ok" : "on");
}

// ------------------------------------------------------------------ catalog

async function showCatalog(query) {
  const input = el("input", { id: "search", type: "search", placeholder: "Search capsules by name, slug or description",
                              value: query || "", "aria-label": "Search capsules" });
  const results = el("div", { id: "catalog", class: "grid" });
  const form = el("form", { class: "searchbar", onsubmit: (e) => { e.preventDefault(); run(); } },
                  input, el("button", { id: "search-go", type: "submit" }, "Search"));
  app.replaceChildren(el("h1", {}, "Capsules"), form, results);
  let seq = 0;
  async function run() {
    const q = input.value.trim();
    const mine = ++seq;
    history.replaceState(null, "", q ? "#/?q=" + encodeURIComponent(q) : "#/");
    try {
      const page = await api("/v1/capsules?limit=50&q=" + encodeURIComponent(q));
      if (mine !== seq) return;
      results.replaceChildren(...(page.capsules.length ? page.capsules.map(card) : [emptyState(q)]));
      results.dataset.query = q;
      results.dataset.count = String(page.capsules.length);
    } catch (e) {
      results.replaceChildren(el("div", { class: "empty" }, "Could not load the catalog: " + e.message));
    }
  }
  let timer = null;
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 200); });
  await run();
}

function emptyState(q) {
  if (q) return el("div", { class: "empty", id: "no-results" }, "No capsules match \u201c" + q + "\u201d.");
  return el("div", { class: "empty", id: "no-results" }, "No capsules in this registry yet. Publish one with ",
            el("code", {}, "ATO_TOKEN=<token> ato publish --registry " + location.origin + " --artifact ./<name>.capsule"));
}

function card(c) {
  return el("a", { class: "card capsule-link", href: "#/capsule/" + c.scoped_id, "data-scoped-id": c.scoped_id },
            el("h3", {}, c.name),
            el("div", { class: "sub" }, c.scoped_id + " \u00b7 v" + c.latestVersion + " \u00b7 " + size(c.latestSizeBytes)),
            c.description ? el("p", {}, c.description) : null);
}

// ------------------------------------------------------------------ detail

async function showDetail(publisher, slug) {
  app.replaceChildren(el("p", {}, "Loading\u2026"));
  let d;
  try {
    d = await api("/v1/capsules/by/" + encodeURIComponent(publisher) + "/" + encodeURIComponent(slug));
  } catch (e) {
    app.replaceChildren(el("a", { class: "back", href: "#/" }, "\u2190 Catalog"),
                        el("div", { class: "empty" }, e.status === 404 ? "Capsule not found." : e.message));
    return;
  }
  const latest = d.releases.find((r) => r.version === d.latestVersion) || d.releases[0] || {};
  const head = el("div", { class: "panel head", id: "detail", "data-scoped-id": d.scoped_id },
    el("h1", { id: "detail-name" }, d.name),
    el("div", { class: "sub" }, d.scoped_id + " \u00b7 latest v" + d.latestVersion),
    d.description ? el("p", {}, d.description) : null,
    el("dl", { class: "facts" },
       el("dt", {}, "Install"), el("dd", {}, el("code", {}, "ato install " + d.scoped_id + " --registry " + location.origin)),
       el("dt", {}, "Size"), el("dd", { id: "latest-size" }, size(latest.size_bytes)),
       el("dt", {}, "BLAKE3"), el("dd", { class: "mono", id: "latest-blake3" }, latest.blake3 || "–"),
       el("dt", {}, "SHA-256"), el("dd", { class: "mono" }, latest.sha256 || "–"),
       el("dt", {}, "Manifest hash"), el("dd", { class: "mono" }, latest.manifest_hash || "–"),
       el("dt", {}, "Download"), el("dd", {}, latest.artifact_url ? el("a", { href: latest.artifact_url }, latest.file_name) : "–")));
  const versions = el("div", { class: "panel" }, el("h2", {}, "Versions"),
    el("table", { id: "versions" },
       el("thead", {}, el("tr", {}, el("th", {}, "Version"), el("th", {}, "Size"), el("th", {}, "Chunks"),
                           el("th", {}, "BLAKE3"), el("th", {}, "Published"))),
       el("tbody", {}, d.releases.map((r) => el("tr", { "data-version": r.version },
          el("td", {}, r.version), el("td", {}, size(r.size_bytes)), el("td", {}, r.chunks === null ? "–" : r.chunks),
          el("td", { class: "mono" }, r.blake3), el("td", {}, r.created_at))))));
  const readme = el("div", { class: "panel" }, el("h2", {}, "README"),
    d.readme_markdown ? renderMarkdown(d.readme_markdown) : el("p", { class: "sub" }, "No README in this artifact."));
  const manifest = el("div", { class: "panel" }, el("h2", {}, "Manifest (capsule.toml)"),
    el("pre", { id: "manifest" }, d.manifest_toml || ""));
  app.replaceChildren(el("a", { class: "back", href: "#/" }, "\u2190 Catalog"), head,
                      runtimeConfigPanel(d), versions, readme, manifest);
}

// A deliberately small Markdown subset (headings, fenced code, paragraphs), rendered as text nodes.
function renderMarkdown(text) {
  const root = el("div", { class: "readme", id: "readme" });
  const lines = text.split("\n");
  let para = [], code = null;
  const flush = () => { if (para.length) { root.append(el("p", {}, para.join(" "))); para = []; } };
  for (const line of lines) {
    if (code !== null) {
      if (line.startsWith("```")) { root.append(el("pre", {}, code.join("\n"))); code = null; } else code.push(line);
      continue;
    }
    if (line.startsWith("```")) { flush(); code = []; continue; }
    const h = /^(#{1,3})\s+(.*)$/.exec(line);
    if (h) { flush(); root.append(el("h" + (h[1].length + 1), {}, h[2])); continue; }
    if (!line.trim()) { flush(); continue; }
    para.push(line.trim());
  }
  flush();
  if (code !== null) root.append(el("pre", {}, code.join("\n")));
  return root;
}

function runtimeConfigPanel(d) {
  const saved = d.runtime_config || { targets: {} };
  const targets = (d.targets && d.targets.length) ? d.targets : Object.keys(saved.targets || {});
  if (!targets.length) targets.push("default");
  const initial = saved.selected_target && targets.includes(saved.selected_target) ? saved.selected_target : targets[0];
  const select = el("select", { id: "rc-target" }, targets.map((t) => el("option", { value: t }, t)));
  select.value = initial;
  const port = el("input", { id: "rc-port", type: "number", min: 1, max: 65535, placeholder: "manifest default" });
  const mode = el("select", { id: "rc-permission" },
                  el("option", { value: "" }, "standard (no override)"),
                  el("option", { value: "sandbox" }, "sandbox"),
                  el("option", { value: "dangerous" }, "dangerous"));
  const envBox = el("div", { id: "rc-env" });
  const status = el("span", { id: "config-status", class: "status" });
  const state = JSON.parse(JSON.stringify(saved));
  state.targets = state.targets || {};

  function envRow(k, v) {
    const row = el("div", { class: "row env-row" },
      el("input", { class: "env-key", placeholder: "NAME", value: k || "", "aria-label": "Environment variable name" }),
      el("input", { class: "env-value", placeholder: "value", value: v || "", "aria-label": "Environment variable value" }),
      el("button", { type: "button", class: "secondary env-remove", onclick: () => row.remove() }, "Remove"));
    return row;
  }
  function load(label) {
    const cfg = state.targets[label] || {};
    port.value = cfg.port || "";
    mode.value = cfg.permission_mode || "";
    envBox.replaceChildren(...Object.entries(cfg.env || {}).map(([k, v]) => envRow(k, v)));
  }
  function collect(label) {
    const env = {};
    for (const row of envBox.querySelectorAll(".env-row")) {
      const k = row.querySelector(".env-key").value.trim();
      if (k) env[k] = row.querySelector(".env-value").value;
    }
    const cfg = { env };
    if (port.value.trim()) cfg.port = Number(port.value);
    if (mode.value) cfg.permission_mode = mode.value;
    state.targets[label] = cfg;
  }
  let current = initial;
  select.addEventListener("change", () => { collect(current); current = select.value; load(current); });
  load(current);

  async function save(e) {
    e.preventDefault();
    collect(current);
    status.className = "status";
    status.textContent = "Saving\u2026";
    if (wellKnown.write_auth_required && !token()) {
      status.className = "status err";
      status.textContent = "This registry needs its write token: enter it above first.";
      return;
    }
    try {
      const body = { selected_target: current, targets: state.targets };
      const [p, s] = d.scoped_id.split("/");
      const normalized = await api("/v1/local/capsules/by/" + encodeURIComponent(p) + "/" + encodeURIComponent(s) +
                                   "/runtime-config", { method: "PUT", json: body, write: true });
      state.targets = normalized.targets || {};
      load(current);
      status.className = "status ok";
      status.textContent = "Saved";
    } catch (err) {
      status.className = "status err";
      status.textContent = (err.status === 401 ? "Token rejected: " : "Not saved: ") + err.message;
    }
  }
  return el("form", { class: "panel", id: "runtime-config", onsubmit: save },
    el("h2", {}, "Runtime configuration"),
    el("p", { class: "sub" }, "Overrides used by later runs of this capsule (per target)."),
    el("div", { class: "row" }, el("label", { for: "rc-target" }, "Target"), select),
    el("div", { class: "row" }, el("label", { for: "rc-port" }, "Port"), port),
    el("div", { class: "row" }, el("label", { for: "rc-permission" }, "Permission mode"), mode),
    el("div", { class: "row" }, el("label", {}, "Environment")),
    envBox,
    el("div", { class: "row" },
       el("button", { type: "button", class: "secondary", id: "rc-add-env", onclick: () => envBox.append(envRow("", "")) }, "Add variable"),
       el("button", { type: "submit", id: "rc-save" }, "Save configuration"), status));
}

// ------------------------------------------------------------------ router

function route() {
  const hash = location.hash || "#/";
  const m = /^#\/capsule\/([^/]+)\/([^/?]+)/.exec(hash);
  if (m) return showDetail(decodeURIComponent(m[1]), decodeURIComponent(m[2]));
  const q = /[?&]q=([^&]*)/.exec(hash);
  return showCatalog(q ? decodeURIComponent(q[1]) : "");
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("token");
  const value = input.value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
  input.value = "";
  input.placeholder = value ? "token set for this tab" : "registry --auth-token";
  renderAuthState();
});

window.addEventListener("hashchange", route);
(async () => {
  try { wellKnown = await api("/.well-known/capsule.json"); } catch (_e) { /* keep defaults */ }
  if (token()) document.getElementById("token").placeholder = "token set for this tab";
  renderAuthState();
  await route();
})();
