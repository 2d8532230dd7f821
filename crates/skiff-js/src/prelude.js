// Skiff JS tier prelude: evaluated (as bytecode) in every isolate before the user's module.
// Rust provides __skiff_log(level, text), __skiff_uuid(), __skiff_env (an object),
// __skiff_fetch(id, url, method, headersJson, body) (starts a request, returns "" or the reason
// it refused), __skiff_timer(id, ms) / __skiff_untimer(id) (the host keeps the timer queue) and
// __skiff_settle(invocation, ok, value, errorDoc) (an invocation's promise settled); they are
// captured here and removed from the global object. The host knows which invocation a
// macrotask (handler call, timer, fetch completion) belongs to, so logs, timers and fetches are
// attributed to it without the prelude tracking invocations.
const log = globalThis.__skiff_log;
const uuid = globalThis.__skiff_uuid;
const envVars = globalThis.__skiff_env;
const hostFetch = globalThis.__skiff_fetch;
const hostTimer = globalThis.__skiff_timer;
const hostUntimer = globalThis.__skiff_untimer;
const hostSettle = globalThis.__skiff_settle;
delete globalThis.__skiff_log;
delete globalThis.__skiff_uuid;
delete globalThis.__skiff_env;
delete globalThis.__skiff_fetch;
delete globalThis.__skiff_timer;
delete globalThis.__skiff_untimer;
delete globalThis.__skiff_settle;

function fmt(v) {
  if (typeof v === "string") return v;
  if (v instanceof Error) return v.stack ? `${v.name}: ${v.message}\n${v.stack}` : `${v.name}: ${v.message}`;
  if (v === undefined || typeof v === "function" || typeof v === "symbol" || typeof v === "bigint") return String(v);
  try { return JSON.stringify(v); } catch { return String(v); }
}
const line = (level) => (...args) => log(level, args.map(fmt).join(" "));
globalThis.console = Object.freeze({
  log: line(""), info: line(""), debug: line(""), trace: line(""),
  warn: line("WARN "), error: line("ERROR "),
});
globalThis.env = Object.freeze(Object.assign(Object.create(null), envVars));
globalThis.crypto = Object.freeze({ randomUUID: () => uuid() });

// Timers: the host orders them by due time and fires each as its own macrotask.
const timers = new Map();
let nextId = 1;
globalThis.setTimeout = (fn, ms = 0, ...args) => {
  if (typeof fn !== "function") throw new TypeError("setTimeout: callback must be a function");
  const id = nextId++;
  timers.set(id, { fn, args });
  hostTimer(id, Math.max(0, Number(ms) || 0));
  return id;
};
globalThis.clearTimeout = (id) => { if (timers.delete(id)) hostUntimer(id); };
/** Runs timer `id` (the host found it due). */
export function fire(id) {
  const t = timers.get(id);
  if (t === undefined) return;
  timers.delete(id);
  t.fn(...t.args);
}
/** Forgets timer `id` and fetch `fetchId` (their invocation finished); 0 = none. */
export function forget(id, fetchId) { timers.delete(id); fetches.delete(fetchId); }
/** Drops every timer and fetch (those left over by module initialisation). */
export function resetTimers() { timers.clear(); fetches.clear(); }

// fetch: the host runs the request; fetchDone settles the promise. Text bodies only.
class Headers {
  #map = new Map();
  constructor(init) {
    if (init instanceof Headers) init = [...init];
    else if (init && typeof init === "object" && typeof init[Symbol.iterator] !== "function") init = Object.entries(init);
    for (const [k, v] of init || []) this.append(k, v);
  }
  append(k, v) { k = String(k).toLowerCase(); const o = this.#map.get(k); this.#map.set(k, o === undefined ? String(v) : `${o}, ${v}`); }
  set(k, v) { this.#map.set(String(k).toLowerCase(), String(v)); }
  get(k) { const v = this.#map.get(String(k).toLowerCase()); return v === undefined ? null : v; }
  has(k) { return this.#map.has(String(k).toLowerCase()); }
  delete(k) { this.#map.delete(String(k).toLowerCase()); }
  forEach(fn, self) { for (const [k, v] of this) fn.call(self, v, k, this); }
  keys() { return [...this].map(([k]) => k)[Symbol.iterator](); }
  values() { return [...this].map(([, v]) => v)[Symbol.iterator](); }
  entries() { return [...this.#map].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))[Symbol.iterator](); }
  [Symbol.iterator]() { return this.entries(); }
}
globalThis.Headers = Headers;
class Response {
  #body; #used = false;
  constructor(body = null, init = {}) {
    this.#body = body == null ? "" : String(body);
    this.status = init.status ?? 200;
    this.statusText = init.statusText ?? "";
    this.headers = new Headers(init.headers);
    this.url = init.url ?? "";
    this.ok = this.status >= 200 && this.status < 300;
  }
  get bodyUsed() { return this.#used; }
  async text() {
    if (this.#used) throw new TypeError("Response body already used");
    this.#used = true;
    return this.#body;
  }
  async json() { return JSON.parse(await this.text()); }
}
globalThis.Response = Response;
const fetches = new Map();
let nextFetch = 1;
globalThis.fetch = (input, init = {}) => new Promise((resolve, reject) => {
  const url = typeof input === "string" ? input : input instanceof URL ? input.href : String(input?.url ?? input);
  const method = String(init.method ?? "GET").toUpperCase();
  const headers = [...new Headers(init.headers)];
  let body = init.body ?? null;
  if (body !== null && typeof body !== "string") {
    body = body instanceof Uint8Array || body instanceof ArrayBuffer ? new TextDecoder().decode(body)
      : body instanceof URLSearchParams ? body.toString() : String(body);
  }
  const id = nextFetch++;
  const refused = hostFetch(id, url, method, JSON.stringify(headers), body);
  if (refused) { reject(new TypeError(`fetch failed: ${refused}`)); return; }
  fetches.set(id, { resolve, reject });
});
/** Settles fetch `id`: `err` is null on success, else the reason it failed. */
export function fetchDone(id, err, status, statusText, url, headersJson, body) {
  const p = fetches.get(id);
  if (!p) return;
  fetches.delete(id);
  if (err !== null) p.reject(new TypeError(`fetch failed: ${err}`));
  else p.resolve(new Response(body, { status, statusText, url, headers: JSON.parse(headersJson) }));
}

// TextEncoder / TextDecoder (UTF-8 only).
globalThis.TextEncoder = class TextEncoder {
  get encoding() { return "utf-8"; }
  encode(s = "") {
    s = String(s);
    const out = [];
    for (const ch of s) {
      let c = ch.codePointAt(0);
      if (c >= 0xd800 && c <= 0xdfff) c = 0xfffd;
      if (c < 0x80) out.push(c);
      else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
      else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
      else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    }
    return new Uint8Array(out);
  }
};
globalThis.TextDecoder = class TextDecoder {
  get encoding() { return "utf-8"; }
  decode(buf) {
    if (buf === undefined) return "";
    const b = buf instanceof ArrayBuffer ? new Uint8Array(buf) : new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
    let s = "";
    for (let i = 0; i < b.length;) {
      const c = b[i];
      let cp = 0xfffd, n = 1;
      if (c < 0x80) cp = c;
      else if (c >= 0xc2 && c < 0xe0 && i + 1 < b.length) { cp = ((c & 31) << 6) | (b[i + 1] & 63); n = 2; }
      else if (c >= 0xe0 && c < 0xf0 && i + 2 < b.length) { cp = ((c & 15) << 12) | ((b[i + 1] & 63) << 6) | (b[i + 2] & 63); n = 3; }
      else if (c >= 0xf0 && c < 0xf5 && i + 3 < b.length) { cp = ((c & 7) << 18) | ((b[i + 1] & 63) << 12) | ((b[i + 2] & 63) << 6) | (b[i + 3] & 63); n = 4; }
      s += String.fromCodePoint(cp);
      i += n;
    }
    return s;
  }
};

// URLSearchParams and a small absolute-URL parser (no IDNA, no relative resolution beyond a base path).
const dec = (s) => { try { return decodeURIComponent(s.replace(/\+/g, " ")); } catch { return s; } };
const enc = (s) => encodeURIComponent(s).replace(/%20/g, "+");
class URLSearchParams {
  #list = [];
  constructor(init = "") {
    if (typeof init === "string") {
      for (const part of init.replace(/^\?/, "").split("&")) {
        if (!part) continue;
        const i = part.indexOf("=");
        this.#list.push(i < 0 ? [dec(part), ""] : [dec(part.slice(0, i)), dec(part.slice(i + 1))]);
      }
    } else if (init && typeof init[Symbol.iterator] === "function") {
      for (const [k, v] of init) this.#list.push([String(k), String(v)]);
    } else if (init && typeof init === "object") {
      for (const k of Object.keys(init)) this.#list.push([k, String(init[k])]);
    }
  }
  get size() { return this.#list.length; }
  append(k, v) { this.#list.push([String(k), String(v)]); this._update?.(); }
  delete(k) { this.#list = this.#list.filter(([n]) => n !== k); this._update?.(); }
  get(k) { const e = this.#list.find(([n]) => n === k); return e ? e[1] : null; }
  getAll(k) { return this.#list.filter(([n]) => n === k).map(([, v]) => v); }
  has(k) { return this.#list.some(([n]) => n === k); }
  set(k, v) {
    const i = this.#list.findIndex(([n]) => n === k);
    if (i < 0) this.#list.push([String(k), String(v)]);
    else { this.#list[i] = [String(k), String(v)]; this.#list = this.#list.filter(([n], j) => n !== k || j === i); }
    this._update?.();
  }
  sort() { this.#list.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)); this._update?.(); }
  forEach(fn, self) { for (const [k, v] of this.#list) fn.call(self, v, k, this); }
  keys() { return this.#list.map(([k]) => k)[Symbol.iterator](); }
  values() { return this.#list.map(([, v]) => v)[Symbol.iterator](); }
  entries() { return this.#list.map((e) => [...e])[Symbol.iterator](); }
  [Symbol.iterator]() { return this.entries(); }
  toString() { return this.#list.map(([k, v]) => `${enc(k)}=${enc(v)}`).join("&"); }
}
globalThis.URLSearchParams = URLSearchParams;

const URL_RE = /^([a-zA-Z][a-zA-Z0-9+.-]*:)\/\/(?:([^:@/?#]*)(?::([^@/?#]*))?@)?(\[[^\]]*\]|[^:/?#]*)(?::(\d*))?([^?#]*)(\?[^#]*)?(#.*)?$/;
const DEFAULT_PORTS = { "http:": "80", "https:": "443", "ws:": "80", "wss:": "443", "ftp:": "21" };
globalThis.URL = class URL {
  #p;
  constructor(input, base) {
    input = String(input);
    let m = URL_RE.exec(input);
    if (!m && base !== undefined) {
      const b = new URL(base);
      const path = input.startsWith("/") ? input : b.pathname.replace(/[^/]*$/, "") + input;
      m = URL_RE.exec(`${b.protocol}//${b.host}${path}`);
    }
    if (!m) throw new TypeError(`Invalid URL: ${input}`);
    const protocol = m[1].toLowerCase();
    const port = m[5] && m[5] !== DEFAULT_PORTS[protocol] ? m[5] : "";
    this.#p = {
      protocol, username: m[2] || "", password: m[3] || "", hostname: m[4].toLowerCase(), port,
      pathname: normalize(m[6] || "/"), hash: m[8] && m[8] !== "#" ? m[8] : "",
    };
    this.searchParams = new URLSearchParams(m[7] || "");
    this.searchParams._update = () => {};
  }
  get protocol() { return this.#p.protocol; }
  get username() { return this.#p.username; }
  get password() { return this.#p.password; }
  get hostname() { return this.#p.hostname; }
  get port() { return this.#p.port; }
  get host() { return this.#p.port ? `${this.#p.hostname}:${this.#p.port}` : this.#p.hostname; }
  get origin() { return `${this.#p.protocol}//${this.host}`; }
  get pathname() { return this.#p.pathname; }
  set pathname(v) { this.#p.pathname = normalize(String(v)); }
  get search() { const s = this.searchParams.toString(); return s ? `?${s}` : ""; }
  set search(v) { this.searchParams = new URLSearchParams(String(v)); }
  get hash() { return this.#p.hash; }
  set hash(v) { v = String(v); this.#p.hash = v && !v.startsWith("#") ? `#${v}` : v; }
  get href() {
    const auth = this.#p.username ? `${this.#p.username}${this.#p.password ? `:${this.#p.password}` : ""}@` : "";
    return `${this.#p.protocol}//${auth}${this.host}${this.#p.pathname}${this.search}${this.#p.hash}`;
  }
  toString() { return this.href; }
  toJSON() { return this.href; }
};
function normalize(path) {
  const out = [];
  const parts = (path.startsWith("/") ? path : `/${path}`).split("/").slice(1);
  parts.forEach((seg, i) => {
    if (seg === "..") { out.pop(); if (i === parts.length - 1) out.push(""); }
    else if (seg === ".") { if (i === parts.length - 1) out.push(""); }
    else out.push(seg);
  });
  return `/${out.join("/")}`;
}

/** Settles invocation `id` through the host when the handler's pending promise (or other
 * thenable) `p` settles. (A result that is ready when the handler's first jobs have run is
 * settled by the host directly.) */
export function watch(id, p) {
  Promise.resolve(p).then(
    (out) => {
      let json;
      try { json = out === undefined ? undefined : JSON.stringify(out); } catch (e) { fail(id, e); return; }
      hostSettle(id, true, json === undefined ? "null" : json, null);
    },
    (e) => fail(id, e));
}
function fail(id, e) {
  let doc = null;
  try { doc = describe(e); } catch {}
  hostSettle(id, false, e, doc);
}

/** The Lambda error document `{errorMessage, errorType, stackTrace}` for a thrown value. */
export function describe(e) {
  const isErr = e !== null && typeof e === "object";
  const errorType = isErr && typeof e.name === "string" ? e.name : "Error";
  const errorMessage = isErr && "message" in e ? String(e.message) : fmt(e);
  const stack = isErr && typeof e.stack === "string" ? e.stack.split("\n").map((l) => l.trim()).filter(Boolean) : [];
  return JSON.stringify({ errorMessage, errorType, stackTrace: stack });
}
