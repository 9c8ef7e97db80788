// The edgeknn page: logs in, shows the live view and the confidence bars, and sends every change as a
// JSON POST with the session's CSRF token. The device's state, readings and events arrive by
// server-sent events; nothing is polled. No framework, no build step, no external asset.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const THUMBS = 12; // newest thumbnails shown per class
const RECORD_INTERVAL_MS = 200; // "Hold to record": an example every 200 ms at most (5 a second)

let csrf = "";
let UNKNOWN = "unknown";
let events = null;
let classes = []; // names in slot order, as the last state gave them
let state = null;
let teachable = true; // false: a classifier model, shown as its top answers' bars only
const TOP = 5; // the bars a classifier model shows
let full = false; // the live view shows the source's full frame instead of the model's
const cards = new Map(); // class name -> its card element
const thumbTimers = new Map();

async function api(path, body) {
  const options = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.method = "POST";
    options.headers = { "Content-Type": "application/json", "X-CSRF-Token": csrf };
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    return { ok: false, error: "the device does not answer" };
  }
  let data;
  try {
    data = await response.json();
  } catch (e) {
    data = { ok: response.ok, error: response.statusText };
  }
  if (response.status === 401 && path !== "/api/login") showLogin();
  return data;
}

function say(text, good = false) {
  $("#message").textContent = text || "";
  $("#message").className = good ? "note" : "error";
}

// --- logging in -------------------------------------------------------------------------------

function showLogin() {
  stopWatching();
  $("#main-view").hidden = true;
  $("#logout").hidden = true;
  $("#login-view").hidden = false;
  $("#password").focus();
}

async function start() {
  const session = await api("/api/session");
  if (!session.ok) return showLogin();
  csrf = session.csrf;
  UNKNOWN = session.unknown;
  teachable = session.teachable;
  document.body.classList.toggle("classifier", !teachable);
  $("#login-view").hidden = true;
  $("#main-view").hidden = false;
  $("#logout").hidden = false;
  if (session.state) showState(session.state);
  $("#full").hidden = !session.full_frame;
  startWatching();
}

$("#login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const result = await api("/api/login", { password: $("#password").value });
  $("#password").value = "";
  if (!result.ok) {
    $("#login-error").textContent = result.error;
    return;
  }
  $("#login-error").textContent = "";
  start();
});

$("#full").addEventListener("click", () => {
  full = !full;
  $("#full").textContent = full ? "As the model sees it" : "Full frame";
  $("#full").setAttribute("aria-pressed", String(full));
  showLive();
});

$("#logout").addEventListener("click", async () => {
  await api("/api/logout", {});
  showLogin();
});

// --- watching: the live view and the event stream, only while the page is visible ----------------

function showLive() {
  $("#live").src = `/api/live.mjpg?full=${full ? 1 : 0}&t=${Date.now()}`;
}

function startWatching() {
  if (document.hidden || events) return;
  showLive();
  events = new EventSource("/api/events");
  let opens = 0;
  events.addEventListener("open", () => {
    $("#dot").className = "dot ok";
    if (opens++ > 0) showLive(); // the stream came back (the device reloaded): so does the live view
  });
  events.addEventListener("error", () => {
    $("#dot").className = "dot down";
    if (events && events.readyState === EventSource.CLOSED) {
      stopWatching();
      setTimeout(start, 3000); // the device restarted, or the session ended
    }
  });
  events.addEventListener("state", (e) => showState(JSON.parse(e.data)));
  events.addEventListener("reading", (e) => showReading(JSON.parse(e.data)));
  events.addEventListener("event", (e) => onEvent(JSON.parse(e.data)));
}

function stopWatching() {
  if (events) events.close();
  events = null;
  $("#live").removeAttribute("src"); // closes the stream: no frame is encoded for nobody
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) stopWatching();
  else if (!$("#main-view").hidden) startWatching();
});

// --- what the device says ------------------------------------------------------------------------

function showState(s) {
  state = s;
  const names = Object.keys(s.classes || {});
  if (teachable && names.join("\n") !== classes.join("\n")) {
    classes = names;
    buildClasses();
  }
  for (const [name, count] of Object.entries(s.classes || {})) {
    const card = cards.get(name);
    if (card) $(".count", card).textContent = count;
  }
  const auto = s.threshold === null || s.threshold === undefined;
  const applied = s.effective_threshold ?? s.threshold;
  $("#threshold-now").textContent =
    (auto ? "automatic" : Number(s.threshold).toFixed(2)) +
    (auto && typeof applied === "number" ? ` (${applied.toFixed(2)} now)` : "");
  showHealth(s);
}

function showHealth(s) {
  const rows = [
    ["camera", s.camera + (s.camera_error ? ": " + s.camera_error : ""), s.camera !== "ok"],
    ["broker", s.broker, !["ok", "disabled"].includes(s.broker)],
    ["fps", s.fps],
    ["inference", `${s.inference_ms} ms`],
    ["error", s.error || "none", !!s.error],
    ["model", s.model_file || String(s.model || "").slice(0, 12)],
    ["examples", s.examples],
    ["version", s.version],
  ];
  const list = $("#health");
  list.replaceChildren();
  for (const [key, value, bad] of rows) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = key;
    dd.textContent = value === undefined ? "" : String(value);
    dd.dataset.key = key;
    if (bad) dd.className = "bad";
    list.append(dt, dd);
  }
}

function showReading(r) {
  const unknown = r.label === UNKNOWN;
  const prediction = $("#prediction");
  prediction.textContent = unknown ? "not recognised" : r.label;
  prediction.title = unknown ? `the answer is “${UNKNOWN}”: no class is similar enough` : "";
  prediction.classList.toggle("unknown", unknown);
  prediction.dataset.label = r.label;
  $("#candidate").textContent = r.candidate ? `settling: ${r.candidate === UNKNOWN ? "not recognised" : r.candidate}` : "";
  if (!teachable) showTop(r.scores);
  for (const [name, card] of cards) {
    const score = r.scores[name] || 0;
    $(".fill", card).style.width = `${(score * 100).toFixed(1)}%`;
    $(".pct", card).textContent = `${Math.round(score * 100)}%`;
    card.dataset.score = score;
    card.classList.toggle("stable", name === r.label);
  }
}

function showTop(scores) {
  // a classifier model: its top answers, each a bar (the model's own labels, nothing to teach)
  const top = Object.entries(scores).sort((a, b) => b[1] - a[1]).slice(0, TOP);
  const list = $("#classes");
  list.replaceChildren();
  for (const [name, score] of top) {
    const row = $("#class-template").content.firstElementChild.cloneNode(true);
    row.dataset.class = name;
    $(".name", row).textContent = name;
    for (const selector of [".count", ".rename", ".remove", ".buttons", ".thumbs"]) $(selector, row).remove();
    $(".fill", row).style.width = `${(score * 100).toFixed(1)}%`;
    $(".pct", row).textContent = `${Math.round(score * 100)}%`;
    list.append(row);
  }
}

function onEvent(event) {
  const name = event.class;
  if (name && cards.has(name)) refreshThumbs(name, 400);
  if (event.event === "reset" || event.event === "examples_imported") {
    for (const n of cards.keys()) refreshThumbs(n, 0);
  }
}

// --- the classes ---------------------------------------------------------------------------------

function buildClasses() {
  const list = $("#classes");
  list.replaceChildren();
  cards.clear();
  for (const name of classes) {
    const card = $("#class-template").content.firstElementChild.cloneNode(true);
    card.dataset.class = name;
    $(".name", card).textContent = name;
    wireClass(card, name);
    list.append(card);
    cards.set(name, card);
    refreshThumbs(name, 0);
  }
}

function wireClass(card, name) {
  $(".add-one", card).addEventListener("click", () => addExample(name));
  const record = $(".record", card);
  let recording = false;
  const stop = () => {
    recording = false;
    record.classList.remove("on");
    record.textContent = "Hold to record";
  };
  record.addEventListener("pointerdown", async (e) => {
    e.preventDefault();
    if (recording) return;
    record.setPointerCapture?.(e.pointerId);
    recording = true;
    record.classList.add("on");
    record.textContent = "Recording…";
    record.dataset.busy = "1"; // until the last request has its answer
    while (recording) {
      const began = performance.now();
      const ok = await addExample(name);
      if (!ok) break;
      const left = RECORD_INTERVAL_MS - (performance.now() - began);
      if (left > 0) await new Promise((resolve) => setTimeout(resolve, left));
    }
    stop();
    delete record.dataset.busy;
  });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) record.addEventListener(type, stop);
  record.addEventListener("contextmenu", (e) => e.preventDefault()); // a long press is not a menu

  const form = $(".rename-form", card);
  $(".rename", card).addEventListener("click", () => {
    form.hidden = false;
    $(".rename-input", card).value = name;
    $(".rename-input", card).focus();
  });
  $(".rename-cancel", card).addEventListener("click", () => (form.hidden = true));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const result = await api("/api/rename-class", { class: name, new_name: $(".rename-input", card).value });
    say(result.ok ? "" : result.error);
    if (result.ok) form.hidden = true;
  });
  $(".remove", card).addEventListener("click", async () => {
    if (!confirm(`Remove the class “${name}” and all its examples?`)) return;
    const result = await api("/api/remove-class", { class: name });
    say(result.ok ? "" : result.error);
  });
}

async function addExample(name) {
  const result = await api("/api/add-example", { class: name, count: 1 });
  say(result.ok ? "" : result.error);
  return result.ok;
}

function refreshThumbs(name, delay) {
  clearTimeout(thumbTimers.get(name));
  thumbTimers.set(name, setTimeout(() => loadThumbs(name), delay));
}

async function loadThumbs(name) {
  const result = await api("/api/examples?class=" + encodeURIComponent(name));
  const card = cards.get(name);
  if (!card || !result.ok) return;
  const examples = result.examples || [];
  const box = $(".thumbs", card);
  box.replaceChildren();
  for (const example of examples.slice(-THUMBS).reverse()) {
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    thumb.dataset.id = example.id;
    if (example.picture) {
      const img = document.createElement("img");
      img.src = `/api/pictures/${example.id}.jpg`;
      img.alt = `example ${example.id} of ${name}`;
      img.loading = "lazy";
      thumb.append(img);
    } else {
      thumb.classList.add("nopic");
      thumb.title = "no picture kept";
    }
    const del = document.createElement("button");
    del.className = "delete";
    del.textContent = "×";
    del.setAttribute("aria-label", `delete example ${example.id}`);
    del.addEventListener("click", async () => {
      const r = await api("/api/delete-example", { id: example.id });
      say(r.ok ? "" : r.error);
      if (r.ok) refreshThumbs(name, 0);
    });
    thumb.append(del);
    box.append(thumb);
  }
  if (examples.length > THUMBS) {
    const more = document.createElement("span");
    more.className = "more";
    more.textContent = `+${examples.length - THUMBS} more`;
    box.append(more);
  }
}

// --- adding a class, the threshold ---------------------------------------------------------------

$("#add-class").addEventListener("submit", async (e) => {
  e.preventDefault();
  const result = await api("/api/add-class", { class: $("#new-class").value.trim() });
  say(result.ok ? "" : result.error);
  if (result.ok) $("#new-class").value = "";
});

$("#threshold").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("#threshold-value").value.trim();
  if (!text) return say("Enter a similarity from -1 to 1, or choose Automatic.");
  const value = Number(text);
  const result = await api("/api/threshold", { value });
  say(result.ok ? "" : result.error);
});

$("#threshold-auto").addEventListener("click", async () => {
  const result = await api("/api/threshold", { value: null });
  say(result.ok ? "" : result.error);
});

// The upload's mode (POST /api/examples.tar?mode=add|replace): "add" adds the examples the device does
// not have yet; "replace" makes the device's classes and examples the file's. Neither ever evicts one.
$("#upload").addEventListener("submit", async (e) => {
  e.preventDefault();
  const file = $("#upload-file").files[0];
  if (!file) return;
  const mode = ($("#upload-mode") && $("#upload-mode").value) || "add";
  let result;
  try {
    const response = await fetch("/api/examples.tar?mode=" + encodeURIComponent(mode), {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/x-tar", "X-CSRF-Token": csrf },
      body: file,
    });
    result = await response.json();
  } catch (err) {
    result = { ok: false, error: "the upload failed: " + err };
  }
  const already = result.skipped ? ` (${result.skipped} were already here)` : "";
  const removed = result.removed ? `, ${result.removed} removed` : "";
  say(result.ok ? `Added ${result.added} examples${already}${removed}.` : result.error, result.ok);
  if (result.ok) $("#upload").reset();
  for (const n of cards.keys()) refreshThumbs(n, 0);
});

start();
