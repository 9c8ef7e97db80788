// The edgeknn page: logs in, shows the live view and the confidence bars, and sends every change as a
// JSON POST with the session's CSRF token. The device's state, readings and events arrive by
// server-sent events; nothing is polled. No framework, no build step, no external asset.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const THUMBS = 12; // newest thumbnails shown in a class's card
const PAGE = 24; // examples per page of the example browser
const RECORD_PER_S = 5; // "Hold to record": examples asked for per second, whatever the answers take
const RECORD_MAX_S = 10; // ... and for at most this long per hold (a lost release never records on)
const RECORD_IN_FLIGHT = 2; // requests open at once; the ticks between wait and go in the next one
const RECORD_BATCH = RECORD_PER_S; // examples one request asks for, at most (a second's worth)
const SMOOTH_S = 0.35; // the bars' time constant: they follow the camera without jumping each frame
const SMOOTH_MAX = 0.5; // ... and never move more than half-way to a new score in one update

let csrf = "";
let UNKNOWN = "unknown";
let events = null;
let downSince = 0; // when the event stream last went down (0: it is open)
const GET_TIMEOUT_S = 15; // a question to the device with no answer by then counts as "no answer"
const STREAM_DOWN_S = 10; // a stream not back within this long is opened anew (a connection can hang)
let classes = []; // names in slot order, as the last state gave them
let state = null;
let teachable = true; // false: a classifier model, shown as its top answers' bars only
const TOP = 5; // the bars a classifier model shows
let full = false; // the live view shows the source's full frame instead of the model's
const cards = new Map(); // class name -> its card element
const thumbTimers = new Map();
const notesAfterBuild = new Map(); // class name -> a note to show once its (new) card exists
let lastReadingAt = 0;

async function api(path, body) {
  const options = { credentials: "same-origin", headers: {} };
  // a question (GET) never waits for ever on a connection that hangs: it is "the device does not answer"
  if (body === undefined && window.AbortSignal?.timeout) options.signal = AbortSignal.timeout(GET_TIMEOUT_S * 1000);
  if (body !== undefined) {
    options.method = "POST";
    options.headers = { "Content-Type": "application/json", "X-CSRF-Token": csrf };
    options.body = JSON.stringify(body);
  }
  return answerOf(path, options);
}

async function answerOf(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    return { ok: false, error: "the device does not answer", away: true };
  }
  let data;
  try {
    data = await response.json();
  } catch (e) {
    data = { ok: response.ok, error: response.status === 413 ? "too large" : response.statusText };
  }
  if (response.status === 401 && path !== "/api/login") showLogin();
  if (response.status >= 500) data.away = true; // a proxy's 502, or the device not yet up
  return data;
}

// --- feedback, next to the control that caused it, in a person's words -----------------------------

// The device answers in a developer's words ("new_name: expected a name that is not reserved (…)"),
// the same as MQTT's: here each becomes what a person can act on. The original stays in the title.
const PLAIN = [
  [/not reserved/, () => `The device uses that word itself (“${UNKNOWN}”, “unknown”, “unavailable”, “none”): choose another name.`],
  [/expected 1-32 characters|expected a string/, () => "Use 1 to 32 letters, digits, spaces, “-”, “_” or “.”, starting with a letter or digit."],
  [/class '(.*)' already exists/, (m) => `There is already a class called “${m[1]}”.`],
  [/already (\d+) classes, the most/, (m) => `The device keeps at most ${m[1]} classes: remove one first.`],
  [/unknown class|cannot rename: '/, () => "That class is no longer on the device (renamed or removed elsewhere)."],
  [/^busy:/, () => "The device is still adding the earlier examples: try again in a moment."],
  [/^no reply from the device/, () => "The device did not answer in time: it may be very busy."],
  [/does not answer/, () => "No answer from the device: is it on, and is this phone on its network?"],
  [/no example \d+/, () => "That example was already deleted."],
  [/another model/, () => "That file was made with another model than this device's, so its examples cannot be used here."],
  [/store\.max_classes \((\d+)\)/, (m) => `That file has more new classes than the device can keep (${m[1]} in all).`],
  [/not JSON|not an edgeknn|expected vectors|base64|invalid class name|unexpected member|not a plain file/, () => "That is not a file of examples from an edgeknn device (what “Download the examples” gives)."],
  [/cut short|damaged/, () => "That file is cut short or damaged: download it again."],
  [/would have (\d+) examples, more than store\.capacity \((\d+)\)/, (m) => `A class would have ${m[1]} examples, more than the device keeps (${m[2]}): delete some first, or replace what it knows.`],
  [/rows of \d+ values|rows with negative values/, () => "That file was made with another model than this device's, so its examples cannot be used here."],
  [/cannot keep the upload/, () => "The device has no room to take the file (its disk is full)."],
  [/stopping or reloading/, () => "The device is restarting: nothing was imported. Upload again in a moment."],
  [/too large|at most \d+ bytes|an upload of more than/, () => "That file is too big for the device."],
  [/not logged in/, () => "Your login has ended: log in again."],
  [/CSRF/, () => "This page is out of date: reload it."],
  [/^value: expected/, () => "Choose a value on the scale, or Automatic."],
];

function plain(error) {
  const text = String(error || "something went wrong");
  for (const [pattern, words] of PLAIN) {
    const match = text.match(pattern);
    if (match) return words(match);
  }
  const rest = text.replace(/^[a-z_]+: /, ""); // a field's name is for developers
  return rest.charAt(0).toUpperCase() + rest.slice(1);
}

function tell(where, text, good = false) {
  // ``where``: the feedback line (.feedback) of the card or form the control is in; it stays until
  // the next answer there (a line that vanished by itself would move the page under a finger)
  if (!where) return;
  where.textContent = text || "";
  where.classList.toggle("note", Boolean(text) && good);
  where.classList.toggle("error", Boolean(text) && !good);
}

function answer(where, result, success = "") {
  // show a request's result next to its control: a plain error, or the success note (if any)
  if (result.ok) tell(where, success, true);
  else tell(where, plain(result.error));
  where.title = result.ok ? "" : result.error || ""; // the device's own words, for whoever debugs
  return result.ok;
}

const feedbackOf = (element) => $(".feedback", element.closest(".card, dialog"));

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
  if (!session.ok && session.away) {
    $("#dot").className = "dot down";
    setTimeout(start, 3000); // still restarting: the login is kept, only a 401 asks for it again
    return;
  }
  if (!session.ok) return showLogin();
  csrf = session.csrf;
  UNKNOWN = session.unknown;
  teachable = session.teachable;
  showDevice(session.device || {}, session.version);
  document.body.classList.toggle("classifier", !teachable);
  $("#login-view").hidden = true;
  $("#main-view").hidden = false;
  $("#logout").hidden = false;
  if (session.state) showState(session.state);
  $("#full").hidden = !session.full_frame;
  startWatching();
}

function showDevice(device, version) {
  const name = device.name || "edgeknn";
  $("#device-name").textContent = name;
  const host = device.host && device.host !== name ? `on ${device.host} · ` : "";
  $("#device-host").textContent = `${host}edgeknn ${version || ""}`.trim();
  document.title = `${name} · edgeknn`;
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
  const stream = new EventSource("/api/events");
  events = stream;
  downSince = 0;
  let opens = 0;
  stream.addEventListener("open", () => {
    downSince = 0;
    $("#dot").className = "dot ok";
    if (opens++ > 0) showLive(); // the stream came back (the device reloaded): so does the live view
  });
  stream.addEventListener("error", () => {
    $("#dot").className = "dot down";
    downSince = downSince || Date.now();
    if (events === stream && stream.readyState === EventSource.CLOSED) {
      stopWatching();
      setTimeout(start, 3000); // the device restarted, or the session ended
    }
  });
  stream.addEventListener("state", (e) => showState(JSON.parse(e.data)));
  stream.addEventListener("reading", (e) => showReading(JSON.parse(e.data)));
  stream.addEventListener("event", (e) => onEvent(JSON.parse(e.data)));
}

// The browser retries a dropped stream by itself, but not one whose new connection hangs (a device
// stopping as it was accepted): a stream down for STREAM_DOWN_S is closed and the page starts again.
setInterval(() => {
  if (events && downSince && Date.now() - downSince > STREAM_DOWN_S * 1000) {
    stopWatching();
    start();
  }
}, 2000);

function stopWatching() {
  if (events) events.close();
  events = null;
  $("#live").removeAttribute("src"); // closes the stream: no frame is encoded for nobody
}

window.addEventListener("pagehide", () => stopRecording("hidden"));
document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    stopRecording("hidden");
    stopWatching();
  } else if (!$("#main-view").hidden) startWatching();
});

// The live view keeps one <img> (one stream): once its card is mostly scrolled away, the image and the
// prediction move into the bar fixed at the top, and back when the card shows again. The card keeps
// its size meanwhile, so nothing below it moves.
function followScroll() {
  const box = $("#live-box");
  const observer = new IntersectionObserver(
    ([entry]) => {
      const away = !entry.isIntersecting || entry.intersectionRatio < 0.35;
      const bar = $("#live-bar");
      const slot = $("#live-slot");
      if (away && box.parentElement !== bar) {
        if (slot.offsetHeight) slot.style.minHeight = `${slot.offsetHeight}px`;
        bar.append(box);
      }
      else if (!away && box.parentElement === bar) $("#live-slot").append(box);
      bar.hidden = !away || $("#main-view").hidden;
      document.body.classList.toggle("live-up", away);
    },
    { threshold: [0, 0.35, 0.6, 1] },
  );
  observer.observe($("#live-slot"));
}

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
    if (!card) continue;
    $(".count", card).textContent = count;
    const browse = $(".browse", card);
    browse.hidden = count === 0;
    browse.textContent = `See all ${count} example${count === 1 ? "" : "s"}`;
    card.recorder?.update();
  }
  // the first-run guide: until the device has its first example
  $("#guide").hidden = !teachable || s.examples > 0;
  $("#guide").classList.toggle("no-classes", names.length === 0);
  showThreshold(s);
  showHealth(s);
  showFleet(s.fleet);
}

// A fleet (docs/fleet.md): a follower says whom it follows (teaching here is refused), a leader its followers.
function showFleet(fleet) {
  const line = $("#fleet");
  let text = "";
  if (fleet && fleet.following) {
    text = `Following ${fleet.following}: teach ${fleet.following}; this device learns what it is taught.`;
  } else if (fleet && fleet.publishing) {
    const n = (fleet.followers || []).length;
    text = n ? `Followed by ${fleet.followers.join(", ")}.` : "Publishing what it is taught for followers.";
  }
  if (fleet && fleet.error) text += ` ${fleet.error}`;
  line.textContent = text;
  line.hidden = !text;
  document.body.classList.toggle("follower", Boolean(fleet && fleet.following));
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
  if (!teachable) return showTop(r.scores);
  // The bars ease toward each reading's scores (a time constant, and at most half-way per reading),
  // so one odd frame nudges a bar instead of throwing it from 77 % to 100 % and back.
  const now = performance.now();
  const dt = lastReadingAt ? (now - lastReadingAt) / 1000 : 1;
  lastReadingAt = now;
  const step = Math.min(SMOOTH_MAX, 1 - Math.exp(-dt / SMOOTH_S));
  for (const [name, card] of cards) {
    const score = r.scores[name] || 0;
    const before = Number(card.dataset.shown || 0);
    const shown = before + step * (score - before);
    $(".fill", card).style.width = `${(shown * 100).toFixed(1)}%`;
    $(".pct", card).textContent = `${Math.round(shown * 100)}%`;
    card.dataset.score = score;
    card.dataset.shown = shown.toFixed(4);
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
    for (const selector of [".count", ".menu", ".buttons", ".thumbs", ".browse", ".feedback"]) $(selector, row).remove();
    $(".fill", row).style.width = `${(score * 100).toFixed(1)}%`;
    $(".pct", row).textContent = `${Math.round(score * 100)}%`;
    list.append(row);
  }
}

function onEvent(event) {
  const name = event.class;
  if (name && cards.has(name)) refreshThumbs(name, 400);
  if (["reset", "examples_imported"].includes(event.event)) for (const n of cards.keys()) refreshThumbs(n, 0);
  if (browser.name && (name === browser.name || ["reset", "examples_imported"].includes(event.event))) {
    browser.reload(400);
  }
}

// --- the classes ---------------------------------------------------------------------------------

function buildClasses() {
  const list = $("#classes");
  for (const card of cards.values()) card.recorder?.stop("rebuilt");
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
    if (notesAfterBuild.has(name)) tell($(".feedback", card), notesAfterBuild.get(name), true);
  }
  notesAfterBuild.clear();
}

function countOf(name) {
  return Number((state && state.classes && state.classes[name]) || 0);
}

function wireClass(card, name) {
  const feedback = $(".feedback", card);
  $(".add-one", card).addEventListener("click", async () => {
    const result = await api("/api/add-example", { class: name, count: 1 });
    answer(feedback, result, "Added one example.");
  });
  card.recorder = new Recorder(card, name);

  const menu = $(".menu", card);
  const form = $(".rename-form", card);
  $(".rename", card).addEventListener("click", () => {
    menu.open = false;
    form.hidden = false;
    $(".rename-input", card).value = name;
    $(".rename-input", card).focus();
  });
  $(".rename-cancel", card).addEventListener("click", () => {
    form.hidden = true;
    tell($(".says", form), "");
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const newName = $(".rename-input", card).value.trim();
    const result = await api("/api/rename-class", { class: name, new_name: newName });
    if (result.ok) notesAfterBuild.set(newName, `Renamed from “${name}”.`);
    if (answer($(".says", form), result)) form.hidden = true;
  });
  $(".clear", card).addEventListener("click", async () => {
    menu.open = false;
    const n = countOf(name);
    if (!confirm(`Forget the ${n} example${n === 1 ? "" : "s"} of “${name}”? The class stays, empty.`)) return;
    const result = await api("/api/forget-class", { class: name });
    answer(feedback, result, `Cleared: ${result.removed} example${result.removed === 1 ? "" : "s"} forgotten.`);
  });
  $(".remove", card).addEventListener("click", async () => {
    menu.open = false;
    if (!confirm(`Remove the class “${name}” and all its examples?`)) return;
    const result = await api("/api/remove-class", { class: name });
    answer(feedback, result);
  });
  $(".browse", card).addEventListener("click", () => browser.open(name));
}

// "Hold to record": while held, examples are asked for at a steady RECORD_PER_S (the ticks that come
// while RECORD_IN_FLIGHT requests are open go together in the next one), so a slow answer never slows
// the recording; the count shown is the class's, as the device's state says. It stops on release, when
// the pointer leaves the button or is cancelled, when the page is hidden, and after RECORD_MAX_S.
const recorders = new Set();

function stopRecording(why) {
  for (const recorder of recorders) recorder.stop(why);
}

class Recorder {
  constructor(card, name) {
    this.card = card;
    this.name = name;
    this.button = $(".record", card);
    this.feedback = $(".feedback", card);
    this.run = null;
    const button = this.button;
    // The pointer is captured: a held button keeps its pointer while the page moves under it (a note
    // or a thumbnail appearing above); only the pointer itself moving off the button ends the hold.
    button.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      button.setPointerCapture?.(e.pointerId);
      this.start();
    });
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      button.addEventListener(type, () => this.stop(type));
    }
    button.addEventListener("pointermove", (e) => {
      const r = button.getBoundingClientRect();
      if (e.clientX < r.left || e.clientX > r.right || e.clientY < r.top || e.clientY > r.bottom) {
        this.stop("pointerleave");
      }
    });
    button.addEventListener("keydown", (e) => {
      if ((e.key === " " || e.key === "Enter") && !e.repeat) {
        e.preventDefault();
        this.start();
      }
    });
    button.addEventListener("keyup", (e) => (e.key === " " || e.key === "Enter") && this.stop("keyup"));
    button.addEventListener("blur", () => this.stop("blur"));
    button.addEventListener("contextmenu", (e) => e.preventDefault()); // a long press is not a menu
  }

  start() {
    if (this.run) return;
    const run = { began: performance.now(), base: countOf(this.name), reached: 0, owed: 0, open: 0, asked: 0, error: "", why: "" };
    this.run = run;
    recorders.add(this);
    this.button.classList.add("on");
    this.button.dataset.recording = "1";
    this.button.dataset.busy = "1"; // until the last request has its answer
    $(".record-time", this.card).hidden = false;
    tell(this.feedback, "");
    run.timer = setInterval(() => this.tick(run), 1000 / RECORD_PER_S);
    this.tick(run);
  }

  tick(run) {
    const elapsed = (performance.now() - run.began) / 1000;
    if (elapsed >= RECORD_MAX_S) return this.stop("cap");
    $(".record-fill", this.card).style.width = `${Math.min(100, (elapsed / RECORD_MAX_S) * 100)}%`;
    run.owed = Math.min(RECORD_BATCH, run.owed + 1);
    if (run.open < RECORD_IN_FLIGHT) this.send(run);
    this.update();
  }

  async send(run) {
    const count = run.owed;
    run.owed = 0;
    run.open += 1;
    run.asked += count;
    const result = await api("/api/add-example", { class: this.name, count });
    run.open -= 1;
    if (result.ok) run.reached = Math.max(run.reached, result.count);
    if (!result.ok && !run.error) {
      run.error = result.error;
      this.stop("error");
    }
    if (this.run !== run) this.finish(run);
    else this.update();
  }

  recorded(run) {
    // the class's count now (the state), or the count the last answer gave if that came first
    return Math.max(0, countOf(this.name) - run.base, run.reached - run.base);
  }

  update() {
    const run = this.run;
    if (run) this.button.textContent = `Recording… ${this.recorded(run)}`;
  }

  stop(why) {
    const run = this.run;
    if (!run) return;
    run.why = why;
    this.button.dataset.stopped = why; // what ended the last hold (release, leave, hidden, cap, error)
    clearInterval(run.timer);
    this.run = null;
    recorders.delete(this);
    this.button.classList.remove("on");
    delete this.button.dataset.recording;
    this.button.textContent = "Hold to record";
    $(".record-time", this.card).hidden = true;
    this.finish(run);
  }

  finish(run) {
    if (run.open > 0 || run.done) return; // the answers still to come finish it
    run.done = true;
    if (!this.run) delete this.button.dataset.busy;
    const n = this.recorded(run);
    const examples = `${n} example${n === 1 ? "" : "s"}`;
    if (run.error) tell(this.feedback, `${plain(run.error)} (${examples} recorded)`);
    else if (run.why === "cap") tell(this.feedback, `Recorded ${examples}: a hold stops after ${RECORD_MAX_S} s. Hold again for more.`, true);
    else if (run.why === "hidden") tell(this.feedback, `Stopped when the page was hidden: ${examples} recorded.`, true);
    else tell(this.feedback, `Recorded ${examples}.`, true);
    this.feedback.dataset.recorded = n;
  }
}

function refreshThumbs(name, delay) {
  // at most one reload per ``delay`` (a recording's examples come faster than that), the first at once
  if (delay > 0 && thumbTimers.has(name)) return;
  clearTimeout(thumbTimers.get(name));
  thumbTimers.set(
    name,
    setTimeout(() => {
      thumbTimers.delete(name);
      loadThumbs(name);
    }, delay),
  );
}

async function loadThumbs(name) {
  const result = await api(`/api/examples?class=${encodeURIComponent(name)}&limit=${THUMBS}`);
  const card = cards.get(name);
  if (!card || !result.ok) return;
  const box = $(".thumbs", card);
  box.replaceChildren(...result.examples.map((example) => thumbnail(example, name, $(".feedback", card))));
}

function thumbnail(example, name, feedback) {
  // one example: its picture (or a grey square where none was kept) and × to delete it
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  thumb.dataset.id = example.id;
  if (example.picture) {
    const img = document.createElement("img");
    img.src = `/api/pictures/${example.id}.jpg`;
    img.alt = `example ${example.id} of ${name}`;
    img.loading = "lazy";
    thumb.append(img);
  } else thumb.classList.add("nopic");
  const when = `added ${new Date(example.added).toLocaleString()}`;
  thumb.title = example.picture ? when : `no picture kept, ${when}`;
  const del = document.createElement("button");
  del.className = "delete";
  del.textContent = "×";
  del.setAttribute("aria-label", `delete example ${example.id}`);
  del.addEventListener("click", async () => {
    del.disabled = true;
    const r = await api("/api/delete-example", { id: example.id });
    if (answer(feedback, r, "Deleted one example.")) thumb.remove();
    else del.disabled = false;
  });
  thumb.append(del);
  return thumb;
}

// --- the example browser: every example of a class, a page at a time, newest first ------------------

const browser = {
  name: "",
  offset: 0,
  timer: 0,
  open(name) {
    this.name = name;
    this.offset = 0;
    $("#browser-title").textContent = `Examples of “${name}”`;
    tell($(".feedback", $("#browser")), "");
    $("#browser-grid").replaceChildren();
    $("#browser").showModal();
    this.load();
  },
  reload(delay) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.load(), delay);
  },
  async load() {
    const name = this.name;
    if (!name) return;
    const path = `/api/examples?class=${encodeURIComponent(name)}&limit=${PAGE}&offset=${this.offset}`;
    const result = await api(path);
    const feedback = $(".feedback", $("#browser"));
    if (name !== this.name) return;
    if (!result.ok) return answer(feedback, result);
    if (result.total > 0 && this.offset >= result.total) {
      this.offset = Math.max(0, Math.floor((result.total - 1) / PAGE) * PAGE); // the last page emptied
      return this.load();
    }
    $("#browser-grid").replaceChildren(...result.examples.map((example) => thumbnail(example, name, feedback)));
    const last = Math.min(this.offset + PAGE, result.total);
    $("#browser-where").textContent = result.total ? `${this.offset + 1}–${last} of ${result.total}` : "no examples";
    $("#browser-prev").disabled = this.offset === 0;
    $("#browser-next").disabled = last >= result.total;
  },
  close() {
    this.name = "";
    if ($("#browser").open) $("#browser").close();
  },
};

$("#browser-prev").addEventListener("click", () => {
  browser.offset = Math.max(0, browser.offset - PAGE);
  browser.load();
});
$("#browser-next").addEventListener("click", () => {
  browser.offset += PAGE;
  browser.load();
});
$("#browser-close").addEventListener("click", () => browser.close());
$("#browser").addEventListener("close", () => (browser.name = ""));

// --- adding a class, the threshold, download and upload ----------------------------------------------

$("#add-class").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("#new-class").value.trim();
  const result = await api("/api/add-class", { class: name });
  if (answer(feedbackOf($("#new-class")), result, `Added “${name}”: now hold “Hold to record” on its card.`)) {
    $("#new-class").value = "";
  }
});

let thresholdTouched = false; // the person is moving the slider: the state does not move it meanwhile

function showThreshold(s) {
  const auto = s.threshold === null || s.threshold === undefined;
  const applied = auto ? s.effective_threshold : s.threshold;
  const value = typeof applied === "number" ? applied : null;
  $("#threshold-now").textContent = auto
    ? `automatic${value === null ? "" : ` (${value.toFixed(2)})`}`
    : `${Number(s.threshold).toFixed(2)}, set by hand`;
  if (!thresholdTouched && value !== null) $("#threshold-range").value = String(value);
}

$("#threshold-range").addEventListener("input", () => (thresholdTouched = true));
$("#threshold-range").addEventListener("change", async () => {
  const value = Number($("#threshold-range").value);
  const result = await api("/api/threshold", { value });
  thresholdTouched = false;
  const before = state && typeof state.effective_threshold === "number" ? state.effective_threshold : null;
  const way = before === null || value === before ? "" : value > before ? "Stricter" : "Looser";
  answer(feedbackOf($("#threshold-range")), result, `${way ? way + ": " : ""}set to ${value.toFixed(2)}.`);
});

$("#threshold-auto").addEventListener("click", async () => {
  const result = await api("/api/threshold", { value: null });
  thresholdTouched = false;
  answer(feedbackOf($("#threshold-auto")), result, "Automatic: calibrated from the examples.");
});

$("#upload-file").addEventListener("change", () => {
  const file = $("#upload-file").files[0];
  $("#upload-name").textContent = file ? file.name : "No file chosen";
  $("#upload-send").disabled = !file;
  tell(feedbackOf($("#upload-file")), "");
});

// The upload: the raw file (the examples archive, or an older JSON export) with the mode chosen:
// "add" adds the examples the device does not have yet, "replace" makes its classes and examples the
// file's. Either is all or nothing, and never evicts an example to make room.
$("#upload").addEventListener("submit", async (e) => {
  e.preventDefault();
  const file = $("#upload-file").files[0];
  const feedback = feedbackOf($("#upload-file"));
  if (!file) return tell(feedback, "Choose a file first.");
  const mode = $("#upload-mode input:checked").value;
  if (mode === "replace" && !confirm("Replace every class and example on the device with the file's?")) return;
  $("#upload-send").disabled = true;
  tell(feedback, "Uploading…", true);
  const result = await answerOf(`/api/examples.tar?mode=${mode}`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/x-tar", "X-CSRF-Token": csrf },
    body: file,
  });
  if (answer(feedback, result, uploaded(result))) {
    $("#upload").reset();
    $("#upload-name").textContent = "No file chosen";
    for (const name of cards.keys()) refreshThumbs(name, 0);
  } else $("#upload-send").disabled = false;
});

function uploaded(result) {
  const n = (count) => `${count} example${count === 1 ? "" : "s"}`;
  if (result.mode === "replace") return `Replaced: ${n(result.removed || 0)} removed, ${n(result.added)} from the file.`;
  const already = result.skipped ? `; ${result.skipped} ${result.skipped === 1 ? "was" : "were"} already here` : "";
  return `Added ${n(result.added)}${already}.`;
}

followScroll();
start();
