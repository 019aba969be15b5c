// Ato Local Registry web page: plain JS, no build step. Hash routes:
//   #/[?q=]                 catalog (GET /v1/capsules?q=&limit=&cursor=, paged with the opaque cursor)
//   #/capsule/<pub>/<slug>  detail (signature, install commands, versions, README, runtime config)
// Registry data is set with textContent, never innerHTML. The one exception is the README, which the
// server renders from Markdown and sanitises (markdown-it-py + nh3) before it reaches the page.
"use strict";

const TOKEN_KEY = "ato.local.registry.token";
const PAGE_SIZE = 24;
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
// The token holder: anyone when the registry takes open writes, else whoever entered a token.
function canWrite() { return !wellKnown.write_auth_required || Boolean(token()); }

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
    const err = new Error(body && body.message ? body.message : resp.status + " " + resp.statusText);
    err.status = resp.status;
    err.code = body && body.error;
    throw err;
  }
  return body;
}

function scopePath(scoped) {
  const [p, s] = scoped.split("/");
  return encodeURIComponent(p) + "/" + encodeURIComponent(s);
}

// ------------------------------------------------------------------ formatting

function size(n) {
  if (n === null || n === undefined) return "\u2013";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let v = n, i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}

function parseTime(iso) {
  // the registry writes microseconds; Date wants at most milliseconds
  return new Date(String(iso).replace(/(\.\d{3})\d+/, "$1"));
}

const RTF = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const STEPS = [["year", 31536000], ["month", 2592000], ["week", 604800], ["day", 86400], ["hour", 3600],
               ["minute", 60], ["second", 1]];

function relativeTime(date) {
  const secs = (date.getTime() - Date.now()) / 1000;
  if (Math.abs(secs) < 45) return "just now";
  for (const [unit, span] of STEPS) {
    if (Math.abs(secs) >= span || unit === "second") return RTF.format(Math.round(secs / span), unit);
  }
  return date.toISOString();
}

function exactTime(date) {
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "long" });
}

// A relative time ("3 minutes ago") that shows the exact time on hover.
function timeEl(iso) {
  if (!iso) return "\u2013";
  const date = parseTime(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const node = el("time", { datetime: date.toISOString(), title: exactTime(date), class: "rel-time" },
                  relativeTime(date));
  return node;
}

setInterval(() => {
  for (const t of document.querySelectorAll("time.rel-time")) t.textContent = relativeTime(new Date(t.dateTime));
}, 30000);

// ------------------------------------------------------------------ shared pieces

function signatureBadge(status, signer, compact) {
  if (status === "verified" && signer) {
    return el("span", { class: "badge signed", title: "Ed25519 signature verified at upload by " + signer.key_id +
                        "\nfingerprint " + signer.fingerprint, "data-status": "verified" },
              "\u2713 Signed", compact ? null : el("span", { class: "mono fp" }, signer.short_fingerprint));
  }
  if (status === "unsigned") {
    return el("span", { class: "badge unsigned", "data-status": "unsigned",
                        title: "No signature: installing needs --allow-unsigned" }, "Unsigned");
  }
  return el("span", { class: "badge", "data-status": "unknown" }, "Signature unknown");
}

function installCommand(scoped, version, unsigned) {
  return "ato install " + scoped + (version ? "@" + version : "") + " --registry " + location.origin +
         (unsigned ? " --allow-unsigned" : "");
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(text); return true; } catch (_e) { /* fall back below */ }
  }
  const area = el("textarea", { class: "offscreen", readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch (_e) { ok = false; }
  area.remove();
  return ok;
}

function copyButton(text, attrs) {
  const button = el("button", Object.assign({ type: "button", class: "copy", "data-copy": text,
                                              "aria-label": "Copy command" }, attrs || {}), "Copy");
  button.addEventListener("click", async () => {
    const ok = await copyText(text);
    button.textContent = ok ? "Copied" : "Copy failed";
    button.classList.toggle("done", ok);
    setTimeout(() => { button.textContent = "Copy"; button.classList.remove("done"); }, 2000);
  });
  return button;
}

function commandBox(text, attrs) {
  return el("div", { class: "command" }, el("code", { class: "cmd-text" }, text), copyButton(text, attrs));
}

// A modal confirmation; resolves true only when the person presses the confirm button.
function confirmDialog({ title, body, confirm, danger }) {
  return new Promise((resolve) => {
    const ok = el("button", { type: "button", id: "confirm-ok", class: danger ? "danger" : "" }, confirm);
    const cancel = el("button", { type: "button", id: "confirm-cancel", class: "secondary" }, "Cancel");
    const dialog = el("dialog", { id: "confirm-dialog", class: "dialog", "aria-labelledby": "confirm-title" },
      el("h2", { id: "confirm-title" }, title),
      ...[].concat(body).map((p) => el("p", {}, p)),
      el("div", { class: "dialog-actions" }, cancel, ok));
    const done = (value) => { dialog.close(); dialog.remove(); resolve(value); };
    ok.addEventListener("click", () => done(true));
    cancel.addEventListener("click", () => done(false));
    dialog.addEventListener("cancel", (e) => { e.preventDefault(); done(false); });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

function toast(text, kind) {
  const box = document.getElementById("toasts");
  const t = el("div", { class: "toast " + (kind || "") , role: "status" }, text);
  box.append(t);
  setTimeout(() => t.remove(), 4000);
}

function renderAuthState() {
  document.body.classList.toggle("no-write", !canWrite());
  const pill = document.getElementById("auth-state");
  if (!wellKnown.write_auth_required) { pill.textContent = "writes open"; pill.className = "pill"; return; }
  pill.textContent = token() ? "token set" : "writes need a token";
  pill.className = "pill " + (token() ? "ok" : "on");
}

// ------------------------------------------------------------------ catalog

async function showCatalog(query) {
  document.title = "Capsules \u00b7 Ato Local Registry";
  const input = el("input", { id: "search", type: "search", placeholder: "Search by name, slug or description",
                              value: query || "", "aria-label": "Search capsules", autocomplete: "off" });
  const total = el("p", { id: "catalog-total", class: "sub" }, "\u00a0");
  const results = el("div", { id: "catalog", class: "grid" });
  const info = el("span", { id: "page-info", class: "sub" });
  const prev = el("button", { type: "button", id: "page-prev", class: "secondary" }, "\u2190 Previous");
  const next = el("button", { type: "button", id: "page-next", class: "secondary" }, "Next \u2192");
  const pager = el("nav", { class: "pager", "aria-label": "Pages" }, prev, info, next);
  const form = el("form", { class: "searchbar", role: "search", onsubmit: (e) => { e.preventDefault(); run(); } },
                  input, el("button", { id: "search-go", type: "submit" }, "Search"));
  app.replaceChildren(el("div", { class: "title-row" }, el("h1", {}, "Capsules"), total), form, results, pager);

  // cursors[i] is the cursor of page i (page 0 has none); the registry hands out the next one
  let cursors = [null], pageIndex = 0, seq = 0;
  async function load() {
    const q = input.value.trim();
    const mine = ++seq;
    let url = "/v1/capsules?limit=" + PAGE_SIZE + "&q=" + encodeURIComponent(q);
    if (cursors[pageIndex]) url += "&cursor=" + encodeURIComponent(cursors[pageIndex]);
    try {
      const page = await api(url);
      if (mine !== seq) return;
      const n = page.capsules.length;
      results.replaceChildren(...(n ? page.capsules.map(card) : [emptyState(q)]));
      results.dataset.query = q;
      results.dataset.count = String(n);
      results.dataset.page = String(pageIndex + 1);
      cursors[pageIndex + 1] = page.next_cursor || null;
      const shown = pageIndex * PAGE_SIZE;
      const count = typeof page.total === "number" ? page.total : null;
      total.textContent = count === null ? "" : count + (count === 1 ? " capsule" : " capsules") +
                          (q ? " match \u201c" + q + "\u201d" : " in this registry");
      total.dataset.total = count === null ? "" : String(count);
      info.textContent = n ? (shown + 1) + "\u2013" + (shown + n) + (count === null ? "" : " of " + count) : "";
      prev.disabled = pageIndex === 0;
      next.disabled = !page.next_cursor;
      pager.hidden = pageIndex === 0 && !page.next_cursor;
    } catch (e) {
      if (e.code === "invalid_cursor") { cursors = [null]; pageIndex = 0; return load(); }
      results.replaceChildren(el("div", { class: "empty" }, "Could not load the catalog: " + e.message));
    }
  }
  function run() {
    const q = input.value.trim();
    history.replaceState(null, "", q ? "#/?q=" + encodeURIComponent(q) : "#/");
    cursors = [null];
    pageIndex = 0;
    return load();
  }
  prev.addEventListener("click", () => { if (pageIndex > 0) { pageIndex--; load().then(() => window.scrollTo(0, 0)); } });
  next.addEventListener("click", () => { if (cursors[pageIndex + 1]) { pageIndex++; load().then(() => window.scrollTo(0, 0)); } });
  let timer = null;
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 200); });
  await run();
}

function emptyState(q) {
  if (q) return el("div", { class: "empty", id: "no-results" }, "No capsules match \u201c" + q + "\u201d.");
  return el("div", { class: "empty", id: "no-results" },
            el("p", {}, "No capsules in this registry yet. Publish one with"),
            commandBox("ATO_TOKEN=<token> ato publish --registry " + location.origin + " --artifact ./<name>.capsule"));
}

function card(c) {
  return el("a", { class: "card capsule-link", href: "#/capsule/" + c.scoped_id, "data-scoped-id": c.scoped_id },
    el("div", { class: "card-head" }, el("h3", {}, c.name), el("span", { class: "version" }, "v" + c.latest_version)),
    el("div", { class: "sub mono-ish" }, c.scoped_id),
    c.description ? el("p", { class: "desc" }, c.description) : null,
    c.tags && c.tags.length ? el("div", { class: "tags" }, c.tags.slice(0, 5).map((t) => el("span", { class: "tag" }, t))) : null,
    el("div", { class: "card-foot" },
       signatureBadge(c.signature_status, c.signer, true),
       el("span", { class: "sub" }, size(c.latest_size_bytes), " \u00b7 ", timeEl(c.updated_at))));
}

// ------------------------------------------------------------------ detail

async function showDetail(publisher, slug) {
  app.replaceChildren(el("p", { class: "sub" }, "Loading\u2026"));
  let d;
  try {
    d = await api("/v1/capsules/by/" + encodeURIComponent(publisher) + "/" + encodeURIComponent(slug));
  } catch (e) {
    app.replaceChildren(el("a", { class: "back", href: "#/" }, "\u2190 All capsules"),
                        el("div", { class: "empty" }, e.status === 404 ? "Capsule not found." : e.message));
    return;
  }
  document.title = d.name + " \u00b7 Ato Local Registry";
  const latest = d.releases.find((r) => r.version === d.latest_version) || d.releases[0] || {};
  const meta = d.metadata || { tags: [], links: {} };
  const unsigned = latest.signature_status === "unsigned";
  const allYanked = d.releases.length > 0 && d.releases.every((r) => r.yanked);

  const byline = [];
  if (meta.author) byline.push(el("span", { id: "detail-author" }, "by ", el("strong", {}, meta.author)));
  byline.push(el("span", {}, "updated ", timeEl(d.updated_at)));
  const links = Object.entries(meta.links || {}).map(([k, url]) =>
    el("a", { href: url, rel: "noopener noreferrer", target: "_blank", class: "link" }, k));

  const head = el("section", { class: "panel head", id: "detail", "data-scoped-id": d.scoped_id },
    el("div", { class: "head-row" },
       el("div", { class: "head-title" },
          el("h1", { id: "detail-name" }, d.name),
          el("div", { class: "sub" }, d.scoped_id + " \u00b7 latest ", el("strong", {}, "v" + d.latest_version))),
       el("div", { id: "detail-signature" }, signatureBadge(latest.signature_status, latest.signer))),
    d.description ? el("p", { class: "lead" }, d.description) : null,
    el("div", { class: "byline sub" }, byline),
    meta.tags && meta.tags.length ? el("div", { class: "tags", id: "detail-tags" },
                                       meta.tags.map((t) => el("span", { class: "tag" }, t))) : null,
    links.length ? el("div", { class: "links", id: "detail-links" }, links) : null,
    allYanked ? el("p", { class: "warn-box" }, "Every version of this capsule is yanked: it is not listed in search " +
                   "and has no latest version. Exact versions can still be installed.") : null,
    el("h2", { class: "install-title" }, "Install"),
    commandBox(installCommand(d.scoped_id, allYanked ? latest.version : null, unsigned),
               { id: "copy-install" }),
    unsigned ? el("p", { class: "sub note" }, "This release is unsigned: ", el("code", {}, "--allow-unsigned"),
                  " is required to install it, and nothing vouches for who built it.") : null);
  head.querySelector(".command").id = "install-cmd";

  const facts = el("section", { class: "panel" }, el("h2", {}, "Latest release"),
    el("dl", { class: "facts" },
       el("dt", {}, "Version"), el("dd", {}, latest.version || "\u2013"),
       el("dt", {}, "Published"), el("dd", {}, timeEl(latest.created_at)),
       el("dt", {}, "Signature"), el("dd", { id: "latest-signature" }, latest.signer
         ? ["Verified Ed25519 signature", el("br"), el("span", { class: "mono", id: "signer-fingerprint" }, latest.signer.fingerprint),
            el("br"), el("span", { class: "mono sub" }, latest.signer.key_id)]
         : "Unsigned"),
       el("dt", {}, "Size"), el("dd", { id: "latest-size" }, size(latest.size_bytes)),
       el("dt", {}, "BLAKE3"), el("dd", { class: "mono", id: "latest-blake3" }, latest.blake3 || "\u2013"),
       el("dt", {}, "SHA-256"), el("dd", { class: "mono" }, latest.sha256 || "\u2013"),
       el("dt", {}, "Manifest hash"), el("dd", { class: "mono" }, latest.manifest_hash || "\u2013"),
       el("dt", {}, "Download"), el("dd", {}, latest.artifact_url ? el("a", { href: latest.artifact_url }, latest.file_name) : "\u2013")));

  const readme = el("section", { class: "panel" }, el("h2", {}, "README"),
    d.readme_html ? readmeNode(d.readme_html) : el("p", { class: "sub" }, "No README in this artifact."));
  const manifest = el("section", { class: "panel" },
    el("details", {}, el("summary", {}, el("h2", { class: "inline" }, "Manifest (capsule.toml)")),
       el("pre", { id: "manifest" }, d.manifest_toml || "")));
  const dangerZone = el("section", { class: "panel danger-zone write-only" }, el("h2", {}, "Delete capsule"),
    el("p", { class: "sub" }, "Removes every version, its artifacts and chunks no other release uses. Prefer yanking a version: " +
       "it stays installable by exact version."),
    el("button", { type: "button", class: "danger", id: "delete-capsule", onclick: () => deleteCapsule(d) },
       "Delete " + d.scoped_id));
  app.replaceChildren(el("a", { class: "back", href: "#/" }, "\u2190 All capsules"), head,
                      versionsPanel(d), readme, facts, runtimeConfigPanel(d), manifest, dangerZone);
}

function readmeNode(html) {
  const node = el("div", { class: "readme", id: "readme" });
  node.innerHTML = html;  // sanitised on the server (nh3); see pipeline/registry/readme.py
  for (const a of node.querySelectorAll("a[href]")) { a.target = "_blank"; a.rel = "noopener noreferrer"; }
  return node;
}

function versionsPanel(d) {
  const rows = d.releases.map((r) => {
    const cmd = installCommand(d.scoped_id, r.version, r.signature_status === "unsigned");
    const actions = el("td", { class: "actions write-only", "data-label": "Manage" },
      el("button", { type: "button", class: "secondary small yank", "data-version": r.version,
                     onclick: () => toggleYank(d, r) }, r.yanked ? "Restore" : "Yank"),
      el("button", { type: "button", class: "danger small delete-version", "data-version": r.version,
                     onclick: () => deleteVersion(d, r) }, "Delete"));
    return el("tr", { "data-version": r.version, class: r.yanked ? "yanked" : "" },
      el("td", { "data-label": "Version" }, el("strong", {}, r.version),
         r.version === d.latest_version && !r.yanked ? el("span", { class: "tag latest" }, "latest") : null,
         r.yanked ? el("span", { class: "tag yanked-tag", title: r.yanked_at ? "yanked " + exactTime(parseTime(r.yanked_at)) : "" }, "yanked") : null),
      el("td", { "data-label": "Published" }, timeEl(r.created_at)),
      el("td", { "data-label": "Size" }, size(r.size_bytes)),
      el("td", { "data-label": "Signature" }, signatureBadge(r.signature_status, r.signer)),
      el("td", { "data-label": "Install", class: "install-cell" },
         el("div", { class: "command compact" }, el("code", { class: "cmd-text" }, cmd),
            copyButton(cmd, { class: "copy version-copy", "data-version": r.version }))),
      actions);
  });
  const headers = ["Version", "Published", "Size", "Signature", "Install"];
  return el("section", { class: "panel" }, el("h2", {}, "Versions ", el("span", { class: "count" }, String(d.releases.length))),
    el("p", { class: "sub" }, "A yanked version is hidden from search and never installed as the latest, but stays " +
       "installable by its exact version."),
    el("table", { id: "versions", class: "versions" },
       el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)), el("th", { class: "write-only" }, "Manage"))),
       el("tbody", {}, rows)));
}

async function needToken() {
  if (canWrite()) return true;
  toast("This registry needs its write token: enter it at the top first.", "err");
  return false;
}

async function toggleYank(d, r) {
  if (!(await needToken())) return;
  const yank = !r.yanked;
  const ok = await confirmDialog(yank ? {
    title: "Yank " + d.scoped_id + "@" + r.version + "?",
    body: ["It disappears from search and is never installed as the latest version.",
           "It stays downloadable by its exact version, so existing pins keep working. You can restore it."],
    confirm: "Yank " + r.version,
  } : { title: "Restore " + d.scoped_id + "@" + r.version + "?", body: ["It becomes searchable and installable as the latest again."],
        confirm: "Restore " + r.version });
  if (!ok) return;
  try {
    await api("/v1/local/capsules/by/" + scopePath(d.scoped_id) + "/yank",
              { method: "POST", json: { version: r.version, yanked: yank }, write: true });
    toast((yank ? "Yanked " : "Restored ") + r.version, "ok");
    await route();
  } catch (e) {
    toast((e.status === 401 ? "Token rejected: " : "Failed: ") + e.message, "err");
  }
}

async function deleteVersion(d, r) {
  if (!(await needToken())) return;
  const last = d.releases.length === 1;
  const ok = await confirmDialog({
    title: "Delete " + d.scoped_id + "@" + r.version + "?",
    body: ["The artifact is removed from this registry for good; anyone pinned to this version can no longer install it." +
           (last ? " It is the only version, so the capsule goes too." : ""), "To hide a version but keep it installable, yank it instead."],
    confirm: "Delete " + r.version, danger: true,
  });
  if (!ok) return;
  try {
    await api("/v1/local/capsules/by/" + scopePath(d.scoped_id) + "?confirmed=true&version=" + encodeURIComponent(r.version),
              { method: "DELETE", write: true });
    toast("Deleted " + r.version, "ok");
    if (last) location.hash = "#/"; else await route();
  } catch (e) {
    toast((e.status === 401 ? "Token rejected: " : "Failed: ") + e.message, "err");
  }
}

async function deleteCapsule(d) {
  if (!(await needToken())) return;
  const ok = await confirmDialog({
    title: "Delete " + d.scoped_id + "?",
    body: ["All " + d.releases.length + " version(s), their artifacts and runtime configuration are removed for good."],
    confirm: "Delete capsule", danger: true,
  });
  if (!ok) return;
  try {
    await api("/v1/local/capsules/by/" + scopePath(d.scoped_id) + "?confirmed=true", { method: "DELETE", write: true });
    toast("Deleted " + d.scoped_id, "ok");
    location.hash = "#/";
  } catch (e) {
    toast((e.status === 401 ? "Token rejected: " : "Failed: ") + e.message, "err");
  }
}

function runtimeConfigPanel(d) {
  const saved = d.runtime_config || { targets: {} };
  const targets = (d.targets && d.targets.length) ? d.targets.slice() : Object.keys(saved.targets || {});
  if (!targets.length) targets.push("default");
  const initial = saved.selected_target && targets.includes(saved.selected_target) ? saved.selected_target : targets[0];
  const select = el("select", { id: "rc-target" }, targets.map((t) => el("option", { value: t }, t)));
  select.value = initial;
  const port = el("input", { id: "rc-port", type: "number", min: 1, max: 65535, placeholder: "manifest default",
                             inputmode: "numeric" });
  const mode = el("select", { id: "rc-permission" },
                  el("option", { value: "" }, "standard (no override)"),
                  el("option", { value: "sandbox" }, "sandbox"),
                  el("option", { value: "dangerous" }, "dangerous (no sandbox)"));
  const modeNote = el("p", { class: "warn-box", id: "rc-dangerous-note", hidden: true },
                      "dangerous runs this capsule without the sandbox: it can read and change anything your user can.");
  mode.addEventListener("change", () => { modeNote.hidden = mode.value !== "dangerous"; });
  const envBox = el("div", { id: "rc-env" });
  const status = el("span", { id: "config-status", class: "status", role: "status" });
  const state = JSON.parse(JSON.stringify(saved));
  state.targets = state.targets || {};

  function envRow(k, v) {
    const row = el("div", { class: "env-row" },
      el("input", { class: "env-key", placeholder: "NAME", value: k || "", "aria-label": "Environment variable name",
                    spellcheck: "false", autocapitalize: "characters" }),
      el("input", { class: "env-value", placeholder: "value", value: v || "", "aria-label": "Environment variable value",
                    spellcheck: "false" }),
      el("button", { type: "button", class: "secondary env-remove", "aria-label": "Remove variable",
                     onclick: () => row.remove() }, "\u00d7"));
    return row;
  }
  function load(label) {
    const cfg = state.targets[label] || {};
    port.value = cfg.port || "";
    mode.value = cfg.permission_mode || "";
    modeNote.hidden = mode.value !== "dangerous";
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
    status.textContent = "";
    if (wellKnown.write_auth_required && !token()) {
      status.className = "status err";
      status.textContent = "This registry needs its write token: enter it at the top first.";
      return;
    }
    // Turning the sandbox off is confirmed every time it is newly asked for (any target).
    const was = (saved.targets || {});
    const newlyDangerous = Object.entries(state.targets)
      .filter(([label, cfg]) => cfg.permission_mode === "dangerous" && (was[label] || {}).permission_mode !== "dangerous")
      .map(([label]) => label);
    if (newlyDangerous.length) {
      const ok = await confirmDialog({
        title: "Run " + d.scoped_id + " without the sandbox?",
        body: ["Permission mode \u201cdangerous\u201d for target " + newlyDangerous.join(", ") +
               " lets this capsule read and change anything your user account can, and reach any network.",
               "Only do this for code you trust."],
        confirm: "Save dangerous mode", danger: true,
      });
      if (!ok) { status.className = "status"; status.textContent = "Not saved"; return; }
    }
    status.textContent = "Saving\u2026";
    try {
      const body = { selected_target: current, targets: state.targets };
      const normalized = await api("/v1/local/capsules/by/" + scopePath(d.scoped_id) + "/runtime-config",
                                   { method: "PUT", json: body, write: true });
      state.targets = normalized.targets || {};
      saved.targets = JSON.parse(JSON.stringify(state.targets));
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
    el("p", { class: "sub" }, "Overrides used by later runs of this capsule, per target."),
    el("div", { class: "field" }, el("label", { for: "rc-target" }, "Target"), select),
    el("div", { class: "field" }, el("label", { for: "rc-port" }, "Port"), port),
    el("div", { class: "field" }, el("label", { for: "rc-permission" }, "Permission mode"), mode),
    modeNote,
    el("div", { class: "field top" }, el("label", {}, "Environment"), envBox),
    el("div", { class: "form-actions" },
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
  renderAuthState();  // shows or hides the token holder's actions
});

window.addEventListener("hashchange", route);
(async () => {
  try { wellKnown = await api("/.well-known/capsule.json"); } catch (_e) { /* keep defaults */ }
  if (token()) document.getElementById("token").placeholder = "token set for this tab";
  renderAuthState();
  await route();
})();
