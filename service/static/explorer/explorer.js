// The explorer page: pick an image, a model and a method; the controls come from the method's
// declared parameters (GET /methods) bounded by the model's dimensions (GET /models); the answer
// is asked for as JSON and drawn here. Uses the public API only.

import * as api from "./api.js";
import * as draw from "./draw.js";

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

// Everything the page knows, on window for tests and for poking at from the console.
const state = {
  models: [],
  methods: [],
  labels: new Map(), // model name -> [label of class i]
  image: null, // {file, name, img, width, height}
  predictions: null,
  columns: [],
};
window.explorer = state;

const currentModel = () => state.models.find((m) => m.name === $("#model").value);
const opacity = () => Number($("#opacity").value);
// long work (GET /methods: kind "long") streams its progress as server-sent events
const isStreaming = (m) => m.kind === "long";

function showGlobalError(err) {
  const box = $("#global-error");
  box.textContent = err ? err.message || String(err) : "";
  box.hidden = !err;
}

function download(blob, name) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

// -- the API key dialog ---------------------------------------------------------------------
function keyDialog(message) {
  return new Promise((resolve) => {
    const dialog = $("#key-dialog"), input = $("#key-input");
    $("#key-message").textContent = message || "This service needs an API key.";
    input.value = api.apiKey() || "";
    $("#key-forget").hidden = !api.apiKey();
    const finish = (value) => {
      dialog.removeEventListener("cancel", onCancel);
      $("#key-form").removeEventListener("submit", onSubmit);
      $("#key-cancel").removeEventListener("click", onCancel);
      $("#key-forget").removeEventListener("click", onForget);
      if (dialog.open) dialog.close();
      resolve(value);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      api.setApiKey(key);
      finish(key);
    };
    const onCancel = (e) => { e.preventDefault(); finish(null); };
    const onForget = () => { api.setApiKey(null); finish(null); };
    dialog.addEventListener("cancel", onCancel);
    $("#key-form").addEventListener("submit", onSubmit);
    $("#key-cancel").addEventListener("click", onCancel);
    $("#key-forget").addEventListener("click", onForget);
    dialog.showModal();
    input.focus();
  });
}
api.setKeyPrompt(keyDialog);
api.onKeyChange((key) => { $("#key-button").hidden = !key; });

// -- parameter controls ---------------------------------------------------------------------
function niceStep(x) {
  return 10 ** Math.floor(Math.log10(x));
}

// One control per declared parameter: {name, decl (its declaration), node, get(), set(v), refresh()}
function makeControl(p, method, model, column) {
  const id = `${column.id}-${p.name}`;
  const wrap = el("div", { class: "ctl", "data-param": p.name, title: p.description });
  const label = el("label", { for: id, text: p.required ? `${p.name} *` : p.name });
  const hint = el("span", { class: "hint", text: p.description });
  wrap.append(label);
  const dim = p.below && model ? model[p.below] : undefined;
  const ctl = { name: p.name, decl: p, node: wrap, refresh() {} };

  if (p.type === "boolean") {
    const box = el("input", { id, name: p.name, type: "checkbox", checked: p.default === true });
    wrap.classList.add("check");
    wrap.append(box);
    ctl.get = () => (box.checked ? "true" : "false");
    ctl.set = (v) => { box.checked = v === true || v === "true"; };
  } else if (p.name === "format" || p.enum) {
    let options = p.name === "format" ? method.formats : p.enum;
    if (p.below && dim != null) options = [...Array.from({ length: dim }, (_, i) => i), ...p.enum];
    const select = el("select", { id, name: p.name });
    for (const o of options) select.append(el("option", { value: String(o), text: String(o) }));
    const initial = p.name === "format" && method.formats.includes("json") ? "json" : p.default;
    select.value = String(initial ?? options[0]);
    wrap.append(select);
    ctl.get = () => select.value;
    ctl.set = (v) => { select.value = String(v); };
    select.addEventListener("change", () => column.paramsChanged());
  } else if (p.type.startsWith("list")) {
    const input = el("input", { id, name: p.name, type: "text", value: (p.default || []).join(",") });
    wrap.append(input);
    ctl.get = () => input.value.split(",").map((s) => s.trim()).filter(Boolean).join(",");
    ctl.set = (v) => { input.value = Array.isArray(v) ? v.join(",") : String(v); };
  } else if (p.type === "integer" || p.type === "number") {
    const int = p.type === "integer";
    const lo = p.minimum ?? p.exclusive_minimum, hi = p.maximum ?? p.exclusive_maximum;
    let step = int ? 1 : lo != null && hi != null ? niceStep((hi - lo) / 100) : null;
    let min = p.minimum ?? (p.exclusive_minimum != null ? p.exclusive_minimum + (step || 1) : null);
    let max = p.maximum ?? (p.exclusive_maximum != null ? p.exclusive_maximum - (step || 1) : null);
    if (dim != null) max = dim - 1;
    const number = el("input", { id, name: p.name, type: "number", min, max, step: int ? 1 : "any",
                                 value: p.default ?? "", required: p.required || null });
    const row = el("div", { class: "row" });
    const slider = min != null && max != null && (int ? max - min <= 1000 : max - min <= 10)
      ? el("input", { type: "range", class: "slider", min, max, step, value: p.default ?? min,
                      "aria-label": p.name })
      : null;
    if (slider) {
      slider.addEventListener("input", () => { number.value = slider.value; ctl.refresh(); });
      number.addEventListener("input", () => { if (number.value !== "") slider.value = number.value; ctl.refresh(); });
      row.append(slider);
    } else {
      number.addEventListener("input", () => ctl.refresh());
    }
    row.append(number);
    wrap.append(row);
    if (max != null) wrap.append(el("span", { class: "range", text: `${min ?? ""} … ${max}${dim != null ? ` (< ${p.below} ${dim})` : ""}` }));
    ctl.get = () => number.value.trim();
    ctl.set = (v) => { number.value = String(v); if (slider) slider.value = String(v); ctl.refresh(); };
    if (p.below === "classes") classPicker(ctl, wrap, number, model);
  } else {
    const input = el("input", { id, name: p.name, type: "text", value: p.default ?? "" });
    wrap.append(input);
    ctl.get = () => input.value.trim();
    ctl.set = (v) => { input.value = String(v); };
  }
  wrap.append(hint);
  return ctl;
}

// A search over the model's labels next to a class id field
function classPicker(ctl, wrap, number, model) {
  const shown = el("span", { class: "class-label" });
  const search = el("input", { type: "search", class: "class-search", placeholder: "search the labels…",
                               "aria-label": `search labels for ${ctl.name}` });
  const list = el("ul", { class: "class-list" });
  const labels = () => (model && state.labels.get(model.name)) || [];
  ctl.refresh = () => {
    const i = Number(number.value);
    const l = labels();
    shown.textContent = number.value !== "" && Number.isInteger(i) && l[i] != null ? l[i] : "";
  };
  search.addEventListener("input", () => {
    list.replaceChildren();
    const q = search.value.trim().toLowerCase();
    if (!q) return;
    const hits = [];
    labels().forEach((l, i) => {
      if (hits.length < 12 && (String(i) === q || l.toLowerCase().includes(q))) hits.push([i, l]);
    });
    if (!hits.length) list.append(el("li", { class: "hint", text: labels().length ? "no label matches" : "labels not loaded" }));
    for (const [i, l] of hits) {
      list.append(el("li", {}, el("button", {
        type: "button", "data-class": i, text: `${i} · ${l}`,
        onclick: () => { ctl.set(i); search.value = ""; list.replaceChildren(); },
      })));
    }
  });
  wrap.append(shown, search, list);
  ctl.refresh();
}

// -- one column: a setting and its answer ---------------------------------------------------
class Column {
  constructor(id, name) {
    this.id = id;
    this.root = $("#column-template").content.firstElementChild.cloneNode(true);
    this.root.id = `column-${id}`;
    this.root.dataset.column = id;
    this.form = $(".setting", this.root);
    this.methodSelect = $(".method", this.root);
    this.pane = $(".pane", this.root);
    this.pane.id = `pane-${id}`;
    this.view = $(".view", this.root);
    $(".setting-name", this.root).textContent = name;
    for (const m of state.methods) this.methodSelect.append(el("option", { value: m.name, text: m.name, title: m.summary }));
    this.controls = [];
    this.last = null;
    this.stop = () => {};
    this.abort = null;
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.run(); });
    this.saved = {}; // method name -> its values when the user switched away from it
    this.methodSelect.addEventListener("change", () => this.switchMethod());
    $(".download-json", this.root).addEventListener("click", () => this.downloadJson());
    $(".download-png", this.root).addEventListener("click", () => this.downloadPng());
    $(".copy-curl", this.root).addEventListener("click", () => this.copyCurl());
  }

  get method() {
    return state.methods.find((m) => m.name === this.methodSelect.value);
  }

  values() {
    return Object.fromEntries(this.controls.map((c) => [c.name, c.get()]));
  }

  // another method: its own values as the user left them (else its defaults), the class kept
  switchMethod() {
    const values = this.values();
    if (this.built) this.saved[this.built] = values;
    const next = { ...(this.saved[this.method.name] || {}) };
    for (const p of this.method.params) {  // the class kept: a parameter that indexes the model's classes
      if (p.below === "classes" && values[p.name]) next[p.name] = values[p.name];
    }
    this.build(next);
  }

  // (re)build the controls for the chosen method and model, keeping the values that still apply
  build(values = this.values()) {
    const m = this.method, model = currentModel();
    this.built = m.name;
    $(".summary", this.root).textContent = m.summary;
    const box = $(".params", this.root);
    box.replaceChildren();
    this.controls = m.params.map((p) => makeControl(p, m, model, this));
    this.startFromImage = null;
    if (m.image === "optional") {
      const input = el("input", { type: "checkbox", class: "use-image" });
      this.startFromImage = input;
      box.append(el("div", { class: "ctl check" }, el("label", {}, input, " start from the uploaded image (else the method's own start)")));
    }
    for (const c of this.controls) {
      const v = values[c.name];
      if (v != null && v !== "" && !(c.name === "format" && !m.formats.includes(v))) c.set(v);
      box.append(c.node);
    }
    this.fillClass();
    this.paramsChanged();
  }

  // a required class id with no value yet takes the image's top prediction
  fillClass(force = null) {
    for (const c of this.controls) {
      if (c.decl.below !== "classes") continue;
      if (force != null) c.set(force);
      else if (c.get() === "" && state.predictions?.length) c.set(state.predictions[0].class_id);
      c.refresh();
    }
  }

  // a parameter declared to apply only when others have some values (GET /methods' `when`) shows only then
  paramsChanged() {
    const byName = new Map(this.controls.map((c) => [c.name, c]));
    for (const c of this.controls) {
      const when = Object.entries(c.decl.when || {});
      c.node.hidden = when.some(([name, values]) => byName.has(name) && !values.map(String).includes(byName.get(name).get()));
    }
  }

  // the fields to send: what differs from the defaults, required ones and the format
  fields() {
    const fields = {}, missing = [];
    for (const c of this.controls) {
      if (c.node.hidden) continue;
      const p = c.decl, v = c.get();
      if (v === "") {
        if (p.required) missing.push(p.name);
        continue;
      }
      if (p.name !== "format" && !p.required && p.default != null) {
        const d = Array.isArray(p.default) ? p.default.join(",") : String(p.default);
        const same = typeof p.default === "number" ? Number(v) === p.default && v.trim() !== "" : v === d;
        if (same || (Array.isArray(p.default) && v.split(",").map(Number).join(",") === p.default.map(Number).join(","))) continue;
      }
      fields[p.name] = v;
    }
    return { fields, missing };
  }

  setState(s, text = "") {
    this.pane.dataset.state = s;
    $(".status", this.pane).textContent = text;
  }

  showError(err) {
    const box = $(".error", this.pane);
    box.textContent = err ? err.message || String(err) : "";
    box.hidden = !err;
  }

  reset() {
    this.stop();
    this.stop = () => {};
    this.view.replaceChildren();
    this.showError(null);
  }

  async run() {
    const m = this.method, model = currentModel();
    this.abort?.abort();
    const abort = (this.abort = new AbortController());
    this.reset();
    const { fields, missing } = this.fields();
    const needImage = m.image === "required" || this.startFromImage?.checked;
    let problem = null;
    if (!model) problem = "No model is ready.";
    else if (needImage && !state.image) problem = "Drop or choose an image first.";
    else if (missing.length) problem = `Set ${missing.join(", ")}.`;
    if (problem) {
      this.showError(new Error(problem));
      this.setState("error");
      return;
    }
    const image = needImage ? state.image : null;
    const request = { model: model.name, ...fields };
    const stream = isStreaming(m);
    const format = fields.format || m.formats[0];
    const ext = format === "apng" ? "png" : format;
    const curl = api.curlCommand(m.path, image, request, { stream, output: stream || format === "json" ? null : `${m.name}.${ext}` });
    const pre = $(".curl", this.pane);
    pre.textContent = curl;
    pre.hidden = false;
    this.last = { method: m.name, path: m.path, request, curl, format, response: null, blob: null, drawn: null };
    this.setState("running", stream ? "starting…" : "working…");
    const started = performance.now();
    try {
      if (stream) {
        await this.runStream(m, image, request, abort.signal);
      } else {
        const resp = await api.call(m.path, { method: "POST", body: api.formBody(image, request), signal: abort.signal });
        if (format === "json") this.show(await resp.json());
        else this.showPicture(await resp.blob(), ext);
      }
      if (abort.signal.aborted) return;
      $(".actions", this.pane).hidden = false;
      this.setState("done", `${m.name} in ${((performance.now() - started) / 1000).toFixed(2)} s`);
    } catch (err) {
      if (abort.signal.aborted) return;
      this.showError(err);
      this.setState("error");
    }
  }

  // -- views ---------------------------------------------------------------------------------
  stage(mask, { width = null, cls = "" } = {}) {
    const img = state.image;
    const [w, h] = width ? draw.fit(img.width, img.height, width, width) : draw.fit(img.width, img.height);
    const base = el("canvas", { class: "base" });
    draw.drawImage(base, img.img, w, h);
    const heat = el("canvas", { class: "heat" });
    heat.style.opacity = opacity();
    draw.drawHeat(heat, mask, w, h);
    const node = el("div", { class: `stage ${cls}` }, base, heat);
    return { node, base, heat, w, h };
  }

  colourBar() {
    const bar = el("canvas", { class: "colour-bar", "aria-label": "colour bar from 0 to 1" });
    const node = el("figure", { class: "bar" }, bar);
    this.view.append(node);
    draw.colourBar(bar);
  }

  show(data) {
    this.last.response = data;
    this.pane.dataset.kind = "";
    if (data.predictions?.length) setPredictions(data.predictions);
    if (data.mask || data.map) {
      const mask = data.mask || data.map;
      const s = this.stage(mask);
      this.view.append(s.node);
      this.colourBar();
      this.last.drawn = { kind: "mask", mask, width: s.w, height: s.h, canvas: s.heat };
      this.pane.dataset.kind = "mask";
      if (data.faithfulness) this.view.append(faithfulnessView(data.faithfulness).node);
    } else if (data.layers) {
      this.showLayers(data);
    } else if (data.masks) {
      this.showSweep(data);
    } else if (data.image && data.objective) {
      this.showLongResult(data);
    } else if (data.predictions) {
      this.view.append(predictionList(data.predictions));
      this.last.drawn = { kind: "predictions" };
      this.pane.dataset.kind = "predictions";
    } else {
      this.view.append(el("pre", { text: JSON.stringify(data, null, 2) }));
    }
  }

  showPicture(blob, ext) {
    this.last.blob = blob;
    this.last.ext = ext;
    const img = el("img", { class: "picture", src: URL.createObjectURL(blob), alt: "the service's picture" });
    this.view.append(img);
    this.last.drawn = { kind: "picture" };
    this.pane.dataset.kind = "picture";
  }

  showLayers(data) {
    const grid = el("div", { class: "montage" });
    const tiles = data.layers.map((mask, i) => {
      const s = this.stage(mask, { width: 160, cls: "tile" });
      grid.append(el("figure", { "data-layer": i }, s.node, el("figcaption", { text: `layer ${i}` })));
      return s;
    });
    this.view.append(grid);
    this.colourBar();
    this.last.drawn = { kind: "layers", masks: data.layers, width: tiles[0]?.w, height: tiles[0]?.h,
                        canvases: tiles.map((t) => t.heat) };
    this.pane.dataset.kind = "layers";
  }

  showSweep(data) {
    const s = this.stage(data.masks[0]);
    const n = data.masks.length;
    // the parameters GET /methods declares by role: the frames' values and each frame's duration
    const method = state.methods.find((m) => m.name === this.last.method);
    const byRole = (role) => method?.params.find((p) => p.role === role);
    const frames = byRole("frames"), duration = byRole("frame-ms");
    const values = frames ? data.params?.[frames.name] ?? data[frames.name] : null;
    const frameMs = Number(duration && data.params?.[duration.name]) || 500;
    const play = el("button", { type: "button", class: "play", text: "Pause" });
    const slider = el("input", { type: "range", class: "frame", min: 0, max: n - 1, step: 1, value: 0, "aria-label": "frame" });
    const label = el("span", { class: "ratio" });
    this.view.append(s.node, el("div", { class: "player" }, play, slider, label));
    this.colourBar();
    const scores = data.faithfulness ? faithfulnessView(data.faithfulness[0]) : null;
    if (scores) this.view.append(scores.node);
    this.last.drawn = { kind: "sweep", mask: data.masks[0], frame: 0, width: s.w, height: s.h, canvas: s.heat };
    this.pane.dataset.kind = "sweep";
    const setFrame = (k) => {
      draw.drawHeat(s.heat, data.masks[k], s.w, s.h);
      slider.value = String(k);
      label.textContent = `${values ? `${frames.name.replace(/_/g, " ")} ${values[k]} · ` : ""}frame ${k + 1}/${n}`;
      this.last.drawn.mask = data.masks[k];
      this.last.drawn.frame = k;
      this.pane.dataset.frame = String(k);
      scores?.update(data.faithfulness[k]);
    };
    let timer = null;
    const start = () => {
      timer = setInterval(() => setFrame((Number(slider.value) + 1) % n), frameMs);
      play.textContent = "Pause";
      this.pane.dataset.playing = "true";
    };
    const pause = () => {
      clearInterval(timer);
      timer = null;
      play.textContent = "Play";
      this.pane.dataset.playing = "false";
    };
    play.addEventListener("click", () => (timer ? pause() : start()));
    slider.addEventListener("input", () => { pause(); setFrame(Number(slider.value)); });
    setFrame(0);
    start();
    this.stop = pause;
  }

  async runStream(m, image, request, signal) {
    let total = 0; // from the progress events
    const text = el("p", { class: "progress", text: "waiting for the first step…" });
    const chart = el("canvas", { class: "chart", width: 360, height: 110, "aria-label": "objective per step" });
    const stop = el("button", { type: "button", class: "stop", text: "Stop", onclick: () => this.abort?.abort() });
    this.view.append(el("div", { class: "live" }, text, chart, stop));
    const objective = [];
    let result = null;
    this.last.progress = objective;
    const resp = await api.call(m.path, { method: "POST", body: api.formBody(image, request), accept: "text/event-stream", signal });
    if (!(resp.headers.get("content-type") || "").includes("text/event-stream")) {
      result = await resp.json();  // an answer without progress (a proxy that buffers)
    } else {
      await api.readEvents(resp, (name, data) => {
        if (name === "progress") {
          total = data.total;
          objective.push(data.objective);
          text.textContent = `step ${data.step + 1}/${total} · objective ${Number(data.objective).toPrecision(5)}`;
          this.pane.dataset.step = String(data.step + 1);
          draw.lineChart(chart, objective, total);
        } else if (name === "result") {
          result = data;
        } else if (name === "error") {
          throw new api.ApiError(200, data.detail);
        }
      });
    }
    stop.remove();
    if (!result) throw new Error("the stream ended without a result");
    this.last.response = result;
    draw.lineChart(chart, result.objective, result.objective.length);
    this.showLongResult(result);
  }

  showLongResult(data) {
    this.last.response = data;
    const img = el("img", { class: "long-result", src: `data:image/png;base64,${data.image}`, alt: "the picture of the result" });
    // the finished picture's objective where the answer measures it (after the last step), else the last step's
    const last = data.final_objective ?? data.objective.at(-1);
    const num = (v) => (v == null ? "–" : Number(v).toPrecision(5));
    // robustness: how much of its gain the picture keeps under held-out transforms (docs/methods.md)
    const robust = "robustness" in data ? ` · robustness ${data.robustness == null ? "–" : Number(data.robustness).toFixed(2)}` : "";
    this.pane.dataset.robustness = data.robustness == null ? "" : String(data.robustness);
    this.view.append(el("figure", { class: "result" }, img,
      el("figcaption", { text: `${data.objective.length} steps, final objective ${num(last)}${robust}` })));
    this.last.drawn = { kind: "long" };
    this.pane.dataset.kind = "long";
  }

  refreshOpacity() {
    for (const c of this.view.querySelectorAll("canvas.heat")) c.style.opacity = opacity();
  }

  // -- downloads -------------------------------------------------------------------------------
  downloadJson() {
    if (!this.last?.response) return;
    download(new Blob([JSON.stringify(this.last.response, null, 2)], { type: "application/json" }), `${this.last.method}.json`);
  }

  async downloadPng() {
    const d = this.last?.drawn;
    if (!d) return;
    const name = `${this.last.method}.png`;
    let canvas = null;
    if (d.kind === "picture") return download(this.last.blob, `${this.last.method}.${this.last.ext}`);
    if (d.kind === "long") {
      const bytes = Uint8Array.from(atob(this.last.response.image), (c) => c.charCodeAt(0));
      return download(new Blob([bytes], { type: "image/png" }), name);
    }
    if (d.kind === "mask" || d.kind === "sweep") {
      canvas = draw.composite(state.image.img, d.mask, d.width, d.height, opacity());
    } else if (d.kind === "layers") {
      const cols = Math.min(4, d.masks.length), rows = Math.ceil(d.masks.length / cols);
      canvas = el("canvas", { width: cols * d.width, height: rows * d.height });
      const ctx = canvas.getContext("2d");
      d.masks.forEach((mask, i) => {
        ctx.drawImage(draw.composite(state.image.img, mask, d.width, d.height, opacity()), (i % cols) * d.width, Math.floor(i / cols) * d.height);
      });
    }
    if (canvas) canvas.toBlob((blob) => download(blob, name), "image/png");
  }

  async copyCurl() {
    const pre = $(".curl", this.pane);
    try {
      await navigator.clipboard.writeText(pre.textContent);
      $(".copy-curl", this.pane).textContent = "Copied";
      setTimeout(() => { $(".copy-curl", this.pane).textContent = "Copy curl"; }, 1500);
    } catch {
      getSelection().selectAllChildren(pre);
    }
  }
}

// -- faithfulness: the deletion and insertion curves of a map, and their areas ---------------------
function labelOf(classId) {
  const l = state.labels.get(currentModel()?.name)?.[classId];
  return l == null ? `class ${classId}` : `${l} (${classId})`;
}

function faithfulnessView(f, { small = false } = {}) {
  const chart = el("canvas", { class: "curves", width: small ? 160 : 360, height: small ? 70 : 120,
                               "aria-label": "deletion and insertion curves" });
  const text = el("p", { class: "areas" });
  const node = el("figure", { class: "faithfulness" }, chart, text);
  const update = (f) => {
    node.dataset.deletionAuc = String(f.deletion_auc);
    node.dataset.insertionAuc = String(f.insertion_auc);
    draw.curves(chart, f.deletion, f.insertion);
    text.replaceChildren(
      el("span", { class: "deletion", text: `deletion AUC ${f.deletion_auc.toFixed(3)}` }), " · ",
      el("span", { class: "insertion", text: `insertion AUC ${f.insertion_auc.toFixed(3)}` }),
      small ? null : el("span", { class: "hint", text: ` · ${labelOf(f.class_id)}, ${f.steps} steps, ${f.removal}, ${f.order} first` }));
  };
  update(f);
  return { node, update };
}

// -- POST /compare: several settings on the image, ranked, as a table of thumbnails ----------------
// every method GET /methods declares comparable, at its defaults; a required class is the top prediction
const DEFAULT_SETTINGS = (cls) => state.methods.filter((m) => m.comparable).map((m) => ({
  method: m.name,
  params: Object.fromEntries(m.params.filter((p) => p.required && p.below === "classes").map((p) => [p.name, cls])),
}));

function settingText(s) {
  const params = Object.entries(s.params || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  return params ? `${s.method} ${params}` : s.method;
}

async function runComparison() {
  const box = $("#comparison"), out = $("#comparison-result"), error = $("#comparison-error");
  const model = currentModel();
  error.hidden = true;
  out.replaceChildren();
  const fail = (err) => { error.textContent = err.message || String(err); error.hidden = false; box.dataset.state = "error"; };
  if (!state.image) return fail(new Error("Drop or choose an image first."));
  if (!model) return fail(new Error("No model is ready."));
  let settings;
  const text = $("#compare-settings");
  if (!text.value.trim()) text.value = JSON.stringify(DEFAULT_SETTINGS(state.predictions?.[0]?.class_id ?? 0), null, 1);
  try {
    settings = JSON.parse(text.value);
  } catch (err) {
    return fail(new Error(`settings: not JSON (${err.message})`));
  }
  const fields = { model: model.name, settings: JSON.stringify(settings), faithfulness_steps: $("#compare-steps").value,
                   removal: $("#compare-removal").value, order: $("#compare-order").value };
  box.dataset.state = "running";
  try {
    const resp = await api.call("/compare", { method: "POST", body: api.formBody(state.image, fields) });
    const data = await resp.json();
    state.comparison = data;
    out.append(comparisonTable(data));
    box.dataset.state = "done";
  } catch (err) {
    fail(err);
  }
}

function comparisonTable(data) {
  const table = el("table", { class: "ranking" });
  table.append(el("thead", {}, el("tr", {}, ...["rank", "map", "setting", "deletion AUC", "insertion AUC", "curves"]
    .map((t) => el("th", { text: t })))));
  const body = el("tbody");
  data.ranking.forEach((i, rank) => {
    const r = data.results[i];
    const [w, h] = draw.fit(state.image.width, state.image.height, 128, 64);
    const base = el("canvas", { class: "base" }), heat = el("canvas", { class: "heat" });
    draw.drawImage(base, state.image.img, w, h);
    draw.drawHeat(heat, r.mask, w, h);
    heat.style.opacity = opacity();
    const thumb = el("div", { class: "stage thumb" }, base, heat);
    const f = r.faithfulness;
    body.append(el("tr", { "data-result": i },
      el("td", { text: String(rank + 1) }), el("td", {}, thumb),
      el("td", { class: "setting-text", text: settingText(r) }),
      el("td", { class: "deletion", text: f.deletion_auc.toFixed(3) }),
      el("td", { class: "insertion", text: f.insertion_auc.toFixed(3) }),
      el("td", {}, faithfulnessView(f, { small: true }).node.querySelector("canvas"))));
  });
  table.append(body);
  return table;
}

// -- predictions, models, images ------------------------------------------------------------
function predictionList(predictions) {
  const list = el("ol", { class: "predictions" });
  for (const p of predictions) {
    list.append(el("li", {}, el("button", {
      type: "button", "data-class": p.class_id, title: "explain this class",
      onclick: () => state.columns.forEach((c) => c.fillClass(p.class_id)),
    }, el("span", { class: "label", text: `${p.label} (${p.class_id})` }),
       el("span", { class: "score", text: `${(100 * p.score).toFixed(1)}%` }),
       el("span", { class: "meter", style: `--score: ${p.score}` }))));
  }
  return list;
}

function setPredictions(predictions) {
  state.predictions = predictions;
  $("#predictions").replaceWith(Object.assign(predictionList(predictions), { id: "predictions" }));
  state.columns.forEach((c) => c.fillClass());
}

async function predict() {
  const model = currentModel();
  if (!state.image || !model) return;
  const image = state.image;
  try {
    const resp = await api.call("/predict", { method: "POST", body: api.formBody(image, { model: model.name }) });
    const data = await resp.json();
    if (state.image === image && currentModel() === model) setPredictions(data.predictions);
    showGlobalError(null);
  } catch (err) {
    showGlobalError(err);
  }
}

async function loadLabels(model) {
  if (!model || state.labels.has(model.name)) return;
  try {
    const data = await api.getJson(`/models/${encodeURIComponent(model.name)}/labels`);
    state.labels.set(model.name, data.labels);
    state.columns.forEach((c) => c.controls.forEach((ctl) => ctl.refresh()));
  } catch (err) {
    showGlobalError(err);
  }
}

async function modelChanged() {
  const model = currentModel();
  $("#model-info").textContent = model
    ? `${model.grid?.join(" × ")} patches · ${model.layers} layers · ${model.heads} heads · head_dim ${model.head_dim} · ${model.classes} classes · ${model.device}`
    : "";
  state.predictions = null;
  $("#predictions").replaceChildren();
  state.columns.forEach((c) => c.build());
  await Promise.all([loadLabels(model), predict()]);
}

async function loadImage(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
  } catch {
    showGlobalError(new Error(`${file.name || "the file"}: the browser cannot show this image`));
    return;
  }
  showGlobalError(null);
  state.image = { file, name: file.name || "image.png", img, width: img.naturalWidth, height: img.naturalHeight };
  const preview = $("#preview");
  preview.src = url;
  preview.hidden = false;
  $("#image-info").textContent = `${state.image.name} · ${img.naturalWidth} × ${img.naturalHeight}`;
  document.body.dataset.image = "loaded";
  state.predictions = null;
  state.columns.forEach((c) => c.fillClass());
  await predict();
}

function setCompare(on) {
  if (on && state.columns.length === 1) {
    const a = state.columns[0], b = new Column("b", "B");
    b.methodSelect.value = a.methodSelect.value;
    b.build(a.values());
    state.columns.push(b);
    $("#columns").append(b.root);
  } else if (!on && state.columns.length > 1) {
    const b = state.columns.pop();
    b.abort?.abort();
    b.stop();
    b.root.remove();
  }
  $("#columns").classList.toggle("compare", state.columns.length > 1);
}

async function init() {
  try {
    [state.models, state.methods] = await Promise.all([api.getJson("/models"), api.getJson("/methods")]);
  } catch (err) {
    showGlobalError(err);
    document.body.dataset.ready = "error";
    return;
  }
  $("#key-button").hidden = !api.apiKey();
  const select = $("#model");
  for (const m of state.models) {
    const ready = m.status === "ready";
    select.append(el("option", { value: m.name, disabled: !ready, text: ready ? m.name : `${m.name} (${m.status}${m.reason ? `: ${m.reason}` : ""})` }));
  }
  const initial = state.models.find((m) => m.default && m.status === "ready") || state.models.find((m) => m.status === "ready");
  if (initial) select.value = initial.name;
  else showGlobalError(new Error("No model is ready yet; reload the page in a moment."));
  const a = new Column("a", "A");
  state.columns.push(a);
  $("#columns").append(a.root);
  a.build({});
  select.addEventListener("change", modelChanged);
  $("#file").addEventListener("change", (e) => loadImage(e.target.files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    loadImage(e.dataTransfer.files[0]);
  });
  $("#opacity").addEventListener("input", () => {
    state.columns.forEach((c) => c.refreshOpacity());
    for (const c of document.querySelectorAll("#comparison canvas.heat")) c.style.opacity = opacity();
  });
  $("#compare").addEventListener("change", (e) => setCompare(e.target.checked));
  $("#compare-run").addEventListener("click", runComparison);
  $("#run-all").addEventListener("click", () => state.columns.forEach((c) => c.run()));
  $("#key-button").addEventListener("click", async () => {
    await keyDialog("Change or forget the API key.");
    $("#key-button").hidden = !api.apiKey();
  });
  await modelChanged();
  document.body.dataset.ready = "true";
}

init();
