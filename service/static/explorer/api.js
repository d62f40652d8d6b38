// The public API as the page uses it: the API key (asked for once, kept for the browser
// session), error details, server-sent events, and the curl command of a request.

const KEY = "vit-explain.api-key";

export class ApiError extends Error {
  constructor(status, detail) {
    super(formatDetail(detail));
    this.status = status;
    this.detail = detail;
  }
}

// {"detail": ...} is a string, or a list of pydantic errors ({loc, msg, ...})
export function formatDetail(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => {
        if (e && typeof e === "object" && "msg" in e) {
          const loc = (e.loc || []).filter((p) => p !== "body").join(".");
          return loc ? `${loc}: ${e.msg}` : e.msg;
        }
        return typeof e === "string" ? e : JSON.stringify(e);
      })
      .join("; ");
  }
  return JSON.stringify(detail);
}

export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
  keyListeners.forEach((f) => f(key));
}

const keyListeners = [];
export function onKeyChange(f) {
  keyListeners.push(f);
}

// Set by the page: shows the key dialog, resolves with the entered key (or null: cancelled).
let askForKey = async () => null;
let asking = null;
export function setKeyPrompt(f) {
  askForKey = f;
}

async function promptOnce(message) {
  if (!asking) asking = askForKey(message).finally(() => { asking = null; });
  return asking;
}

async function errorOf(resp) {
  let detail = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && "detail" in body) detail = body.detail;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, detail);
}

// fetch with the key; on 401 ask for the key (once for concurrent calls) and try again
export async function call(path, { method = "GET", body, accept, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = {};
    const key = apiKey();
    if (key) headers["X-API-Key"] = key;
    if (accept) headers["Accept"] = accept;
    const resp = await fetch(path, { method, body, headers, signal });
    if (resp.status === 401 && attempt < 3) {
      const err = await errorOf(resp);
      const entered = await promptOnce(key ? `The key was refused: ${err.message}` : err.message);
      if (entered == null) throw err;
      continue;
    }
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }
}

export async function getJson(path) {
  return (await call(path)).json();
}

// multipart body: the image file (when given) and the fields, in order
export function formBody(image, fields) {
  const form = new FormData();
  if (image) form.append("image", image.file, image.name);
  for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
  return form;
}

// A server-sent event stream: calls onEvent(name, data) for each event, returns when it ends.
export async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const flush = (block) => {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) onEvent(name, JSON.parse(data.join("\n")));
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      flush(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
  if (buffer.trim()) flush(buffer);
}

// A word the shell reads as written stays bare; anything else is single-quoted, each single quote inside closed, escaped and reopened.
const SHELL_SAFE = /^[A-Za-z0-9_.,:\/=@+-]+$/;
function shellQuote(s) {
  return SHELL_SAFE.test(s) ? s : "'" + s.replaceAll("'", "'\\''") + "'";
}

// The curl command that makes the same request (the key as $VIT_API_KEY, never written out)
export function curlCommand(path, image, fields, { stream = false, output = null } = {}) {
  const parts = [stream ? "curl -sN" : "curl -s"];
  if (apiKey()) parts.push(`-H "X-API-Key: $VIT_API_KEY"`);
  if (stream) parts.push("-H 'Accept: text/event-stream'");
  if (image) parts.push(`-F ${shellQuote(`image=@${image.name}`)}`);
  for (const [k, v] of Object.entries(fields)) parts.push(`-F ${shellQuote(`${k}=${v}`)}`);
  parts.push(shellQuote(new URL(path, location.href).href));
  if (output) parts.push(`-o ${shellQuote(output)}`);
  return parts.join(" ");
}
