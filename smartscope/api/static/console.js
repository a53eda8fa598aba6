// smartscope console: plain JS + canvas on the public API and WS /stream (same origin, no network beyond it).
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "smartscope.token";
const MAX_POINTS = 6000;       // plotted frame summaries kept (older ones thinned, the whole run stays visible)
const MAX_DECISION_ROWS = 300; // rows in the decisions feed
const FRAME_PERIOD_MS = 250;   // the live frame is fetched at most this often
const SR_PERIOD_MS = 2000;     // the super-resolution image is re-rendered this often while a run goes on
const LIVE_STATES = new Set(["acquiring", "paused", "finishing"]);
const POLICY_COLOURS = ["#f2b640", "#3ccf8e", "#ff7ab8", "#4fd8e8", "#b57bff", "#ff8a4f"];

const S = {
  state: "idle", run: null, t0: null, points: [], decisions: [], holds: [], setPoint: null,
  fieldNm: null, channelNames: {}, positions: new Set(), channels: new Set(), inferredChannels: new Set(),
  policyColour: {},
  frameBusy: false, frameAt: 0, srBusy: false, srAgain: false, srAt: 0, srRun: null, srImage: null, view: null,
  decisionCount: 0, plotsDirty: true,
};

// -- the API ------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function describe(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => (e.loc ? `${e.loc.filter((l) => l !== "body").join(".")}: ` : "") + (e.msg ?? JSON.stringify(e)))
      .join("\n");
  }
  if (detail.message) return detail.message;
  return JSON.stringify(detail);
}

function explainRefusal(status, detail, sentToken) {
  const text = describe(detail);
  if (status === 401) return "No token was sent (401): nothing changed. Set the daemon's token (top right).";
  if (/no API token configured|writes are disabled/i.test(text)) {
    return "This daemon accepts no changes: it was started without a token (set SMARTSCOPE_TOKEN and restart it). " +
      "Nothing changed.";
  }
  if (sentToken) {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    return `The daemon refused the token (403: ${text}): nothing changed. The token was forgotten; ` +
      "enter the one the daemon was started with (SMARTSCOPE_TOKEN).";
  }
  return `${status}: ${text}`;
}

async function request(method, path, body, { write = false, raw = false } = {}) {
  if (write && !sessionStorage.getItem(TOKEN_KEY)) {
    const given = await askToken("Changes need the daemon's token (SMARTSCOPE_TOKEN). It is kept for this tab only.");
    if (!given) throw new ApiError(0, "No token given: nothing was sent.");
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch { /* not JSON */ }
    if (r.status === 401 || r.status === 403) {
      const message = explainRefusal(r.status, detail, Boolean(token));
      if (!write) banner(`Reads are protected on this daemon: ${message}`);
      throw new ApiError(r.status, message);
    }
    throw new ApiError(r.status, `${r.status}: ${describe(detail)}`);
  }
  return raw ? r : r.json();
}

function askToken(why) {
  const dialog = $("token-dialog");
  $("token-why").textContent = why;
  $("token-input").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const value = $("token-input").value.trim();
      if (dialog.returnValue === "ok" && value) {
        sessionStorage.setItem(TOKEN_KEY, value);
        showTokenState();
        resolve(value);
      } else resolve(null);
    }, { once: true });
  });
}

function showTokenState() {
  $("token-button").textContent = sessionStorage.getItem(TOKEN_KEY) ? "Token set ✓" : "Set token";
}

function banner(text, info = false) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.className = info ? "info" : "";
}

function say(id, text, ok = false) {
  const el = $(id);
  el.textContent = text;
  el.className = `msg ${ok ? "ok" : "error"}`;
}

// -- the live stream ----------------------------------------------------------------------------------

function connect() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/stream?max_rate_hz=10` +
                           (token ? `&token=${encodeURIComponent(token)}` : ""));
  let opened = false;
  ws.onopen = () => { opened = true; $("conn").textContent = "● live"; $("conn").className = "live"; };
  ws.onmessage = (ev) => onUpdate(JSON.parse(ev.data));
  ws.onclose = () => {
    $("conn").textContent = opened ? "stream closed: reconnecting…"
      : "no stream (daemon down, or reads protected: set the token): retrying…";
    $("conn").className = "muted";
    setTimeout(connect, 2000);
  };
}

function onUpdate(m) {
  if (m.acquisition && m.acquisition !== S.run) newRun(m.acquisition);
  const changed = m.state !== S.state;
  S.state = m.state;
  const badge = $("state");
  badge.textContent = m.state;
  badge.dataset.state = m.state;
  $("run-label").textContent = S.run ? `run ${S.run} · ${m.frames_acquired} frames` : "";
  if (m.frame && m.frame.acquisition === S.run) addPoint(m.frame);
  for (const d of m.decisions || []) addDecision(d);
  enableControls();
  if (LIVE_STATES.has(m.state)) {
    if (m.frame) maybeRefreshFrame();
    if (performance.now() - S.srAt > SR_PERIOD_MS) refreshSR();
  }
  if (changed) {
    refreshRuns();
    if (!LIVE_STATES.has(m.state)) { refreshSR(); refreshFrame(); }
  }
  schedulePlots();
}

function newRun(id) {
  Object.assign(S, { run: id, srRun: id, t0: null, points: [], decisions: [], holds: [], srImage: null, view: null,
                     inferredChannels: new Set() });
  $("decisions").tBodies[0].replaceChildren();
  S.decisionCount = 0;
  request("GET", `/acquisitions/${id}`).then(async (info) => {
    if (S.run !== id) return;
    S.t0 = info.started_s;
    // the decisions made before the page listened (the stream sends those made since)
    const earlier = await request("GET", `/decisions?limit=${MAX_DECISION_ROWS}`).catch(() => []);
    if (S.run === id) backfill(earlier.filter((d) => d.t_s >= info.started_s));
  }).catch(() => {});
  refreshRuns();
}

function decisionKey(d) {
  return `${d.t_s}|${d.frame}|${d.policy}|${d.actuator}|${d.outcome}`;
}

function backfill(earlier) {
  const seen = new Set(S.decisions.map(decisionKey));
  const newer = S.decisions;
  S.decisions = [];
  S.holds = [];
  S.decisionCount = 0;
  $("decisions").tBodies[0].replaceChildren();
  for (const d of [...earlier.filter((d) => !seen.has(decisionKey(d))), ...newer].sort((a, b) => a.t_s - b.t_s)) {
    addDecision(d);
  }
}

// -- the picked field: MDA position and channel -------------------------------------------------------

function noteIndex(index, channelName) {
  if (!index) return;
  if (index.p != null && !S.positions.has(index.p)) { S.positions.add(index.p); fillPick("pick-p", S.positions, (p) => `p${p}`); }
  if (index.c != null) {
    if (channelName) S.channelNames[index.c] = channelName;
    if (!S.channels.has(index.c) || channelName) {
      S.channels.add(index.c);
      fillPick("pick-c", S.channels, (c) => S.channelNames[c] ? `${c}: ${S.channelNames[c]}` : `c${c}`);
    }
  }
}

function fillPick(id, values, label) {
  const select = $(id);
  const keep = select.value;
  select.replaceChildren(new Option("any", ""), ...[...values].sort((a, b) => a - b).map((v) => new Option(label(v), v)));
  select.value = keep;
}

function picked(index) {
  if (!index) return true;
  const p = $("pick-p").value, c = $("pick-c").value;
  return (p === "" || Number(p) === index.p) && (c === "" || Number(c) === index.c);
}

function indexText(index) {
  if (!index) return "";
  return ["t", "p", "g", "c", "z"].filter((k) => index[k] != null).map((k) => `${k}${index[k]}`).join(" ");
}

// -- time plots ---------------------------------------------------------------------------------------

const PLOTS = [
  { title: "emitters / frame", acts: ["activation_mw"],
    left: [["n_emitters", "localized", "#4fa3ff"], ["emitter_count", "counted", "#b57bff"],
           ["set_point", "set point", "#f2b640", true]] },
  { title: "laser power (mW)", acts: ["activation_mw", "excitation_mw"],
    left: [["activation_mw", "activation", "#b57bff"], ["excitation_mw", "excitation", "#ff7070"]] },
  { title: "Z (µm) · defocus estimate (nm)", acts: ["z_um"],
    left: [["z_um", "Z µm", "#3ccf8e"]], right: [["focus_nm", "defocus nm", "#f2b640"]] },
  { title: "frame interval (ms) · event score", acts: ["interval_ms"],
    left: [["interval_ms", "interval ms", "#4fa3ff"]], right: [["event_score", "event score", "#ff7070"]] },
  { title: "view angle (°)", acts: ["angle_deg"], left: [["angle_deg", "angle °", "#4fd8e8"]] },
  { title: "inference latency (ms)", acts: [], left: [["latency_ms", "capture → result", "#c0c8d4"]] },
];

function addPoint(f) {
  if (S.t0 == null) S.t0 = f.t_capture_s;
  if (f.index) S.inferredChannels.add(f.index.c);  // the channels the models read (results come for them only)
  noteIndex(f.index);
  S.points.push({ ...f, t: f.t_capture_s - S.t0, set_point: S.setPoint });
  if (S.points.length > MAX_POINTS) {  // thin the older half: the whole run stays, at a coarser step
    const half = S.points.length >> 1;
    S.points = S.points.slice(0, half).filter((_, i) => i % 2 === 0).concat(S.points.slice(half));
  }
  S.plotsDirty = true;
}

function addDecision(d) {
  S.decisionCount += 1;
  if (d.outcome === "hold") S.holds.push([d.t_s, null]);
  if (d.outcome === "resume" && S.holds.length && S.holds[S.holds.length - 1][1] == null) {
    S.holds[S.holds.length - 1][1] = d.t_s;
  }
  if (d.policy && !(d.policy in S.policyColour)) {
    S.policyColour[d.policy] = POLICY_COLOURS[Object.keys(S.policyColour).length % POLICY_COLOURS.length];
    $("legend").replaceChildren(...Object.entries(S.policyColour).map(([name, colour]) => {
      const span = document.createElement("span");
      span.innerHTML = `<i style="background:${colour}"></i>`;
      span.append(name);
      return span;
    }));
  }
  S.decisions.push(d);
  if (S.decisions.length > 4 * MAX_DECISION_ROWS) S.decisions = S.decisions.slice(-2 * MAX_DECISION_ROWS);
  feedRow(d);
  $("decision-count").textContent = `${S.decisionCount} this run`;
  S.plotsDirty = true;
}

function fmt(v, digits = 3) {
  if (v == null) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(digits)));
  return String(v);
}

function feedRow(d) {
  const tr = document.createElement("tr");
  const hold = d.outcome === "hold" || d.outcome === "resume";
  tr.className = hold ? d.outcome : (d.outcome || "");
  const t = S.t0 != null ? `${(d.t_s - S.t0).toFixed(2)} s` : new Date(d.t_s * 1000).toLocaleTimeString();
  const reason = [d.reason, ...(d.envelope || [])].filter(Boolean).join(" · ");
  const cells = [t, fmt(d.frame), indexText(d.index), d.policy ?? (hold ? "safe hold" : ""), d.actuator ?? "",
    fmt(d.before), fmt(d.requested), fmt(d.applied), d.outcome ?? "", reason,
    d.inputs ? JSON.stringify(d.inputs, (k, v) => (typeof v === "number" ? Number(v.toPrecision(4)) : v)) : ""];
  const classes = ["num", "num", "", "", "", "num", "num", "num", "outcome", "", "inputs"];
  cells.forEach((text, i) => {
    const td = tr.insertCell();
    td.textContent = text;
    if (classes[i]) td.className = classes[i];
  });
  if (d.policy) tr.cells[3].style.color = S.policyColour[d.policy];
  const body = $("decisions").tBodies[0];
  body.prepend(tr);
  while (body.rows.length > MAX_DECISION_ROWS) body.deleteRow(-1);
}

function makePlots() {
  const box = $("plots");
  for (const spec of PLOTS) {
    const canvas = document.createElement("canvas");
    canvas.dataset.title = spec.title;
    spec.canvas = canvas;
    canvas.addEventListener("mousemove", (ev) => hover(ev, spec));
    canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
    box.append(canvas);
  }
}

function schedulePlots() {
  if (S.plotsQueued) return;
  S.plotsQueued = true;
  requestAnimationFrame(() => {
    S.plotsQueued = false;
    if (!S.plotsDirty) return;
    S.plotsDirty = false;
    const pts = S.points.filter((p) => picked(p.index));
    const decisions = S.decisions.filter((d) => d.actuator && picked(d.index));
    const tMax = Math.max(1, pts.length ? pts[pts.length - 1].t : 0);
    for (const spec of PLOTS) drawPlot(spec, pts, decisions, tMax);
  });
}

function range(pts, series) {
  let lo = Infinity, hi = -Infinity;
  for (const [key] of series) for (const p of pts) {
    const v = p[key];
    if (v != null && Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  if (lo === Infinity) return null;
  if (hi - lo < 1e-9) { const pad = Math.abs(hi) * 0.1 || 1; lo -= pad; hi += pad; }
  const pad = (hi - lo) * 0.08;
  return [lo - pad, hi + pad];
}

function ticks(lo, hi, n = 3) {
  const step0 = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((k) => k * mag).find((s) => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) out.push(Math.abs(v) < step * 1e-6 ? 0 : v);
  return out;
}

function sizeCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.round(canvas.clientWidth * dpr), h = Math.round(canvas.clientHeight * dpr);
  if (w && h && (canvas.width !== w || canvas.height !== h)) { canvas.width = w; canvas.height = h; }
  return dpr;
}

function drawPlot(spec, pts, decisions, tMax) {
  const c = spec.canvas, dpr = sizeCanvas(c), g = c.getContext("2d");
  const W = c.width / dpr, H = c.height / dpr;
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, W, H);
  const L = 46, R = spec.right ? 46 : 10, T = 16, B = 16;
  const x = (t) => L + (t / tMax) * (W - L - R);
  spec.geom = { L, R, W, tMax };
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#8592a6";
  g.fillText(spec.title, L, 11);
  let legendX = W - R;  // series legend, right-aligned on the title line
  g.textAlign = "right";
  for (const [, label, colour] of [...(spec.right || []), ...spec.left].reverse()) {
    g.fillStyle = colour;
    g.fillText(label, legendX, 11);
    legendX -= g.measureText(label).width + 10;
  }
  g.textAlign = "left";
  for (const [t0, t1] of S.holds) {  // safe-hold periods
    const a = x(Math.max(0, t0 - S.t0)), b = x(t1 == null ? tMax : t1 - S.t0);
    g.fillStyle = "rgba(255, 80, 80, 0.16)";
    g.fillRect(a, T, Math.max(2, b - a), H - T - B);
  }
  g.strokeStyle = "#2c3542";
  g.strokeRect(L, T, W - L - R, H - T - B);
  for (const t of ticks(0, tMax, 6)) {
    g.fillStyle = "#5d6a7d";
    g.fillText(fmt(t, 3), x(t) - 4, H - 3);
  }
  const axes = [["left", spec.left], ["right", spec.right]];
  for (const [side, series] of axes) {
    if (!series) continue;
    const r = range(pts, series);
    if (!r) continue;
    const y = (v) => T + (1 - (v - r[0]) / (r[1] - r[0])) * (H - T - B);
    g.textAlign = side === "left" ? "right" : "left";
    for (const v of ticks(r[0], r[1], 3)) {
      g.fillStyle = "#5d6a7d";
      g.fillText(fmt(v, 3), side === "left" ? L - 4 : W - R + 4, y(v) + 4);
      if (side === "left") { g.strokeStyle = "#1f2730"; g.beginPath(); g.moveTo(L, y(v)); g.lineTo(W - R, y(v)); g.stroke(); }
    }
    g.textAlign = "left";
    for (const [key, , colour, dashed] of series) {
      g.strokeStyle = colour;
      g.lineWidth = 1.4;
      g.setLineDash(dashed ? [5, 4] : []);
      g.beginPath();
      let open = false;
      for (const p of pts) {
        const v = p[key];
        if (v == null || !Number.isFinite(v)) { open = false; continue; }
        if (open) g.lineTo(x(p.t), y(v)); else { g.moveTo(x(p.t), y(v)); open = true; }
      }
      g.stroke();
      g.setLineDash([]);
    }
  }
  for (const d of decisions) {  // ▲ at the top edge for each decision on this plot's actuators
    if (!spec.acts.includes(d.actuator) || S.t0 == null) continue;
    const px = x(d.t_s - S.t0);
    g.fillStyle = S.policyColour[d.policy] || "#fff";
    g.globalAlpha = d.applied != null && d.applied !== d.before ? 1 : 0.35;
    g.beginPath(); g.moveTo(px, T); g.lineTo(px - 3.5, T + 6); g.lineTo(px + 3.5, T + 6); g.fill();
    g.globalAlpha = 1;
  }
}

function hover(ev, spec) {
  const tip = $("tooltip");
  const pts = S.points.filter((p) => picked(p.index));
  if (!spec.geom || !pts.length) { tip.hidden = true; return; }
  const rect = spec.canvas.getBoundingClientRect();
  const { L, R, W, tMax } = spec.geom;
  const t = ((ev.clientX - rect.left) - L) / (W - L - R) * tMax;
  let lo = 0, hi = pts.length - 1;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (pts[mid].t < t) lo = mid + 1; else hi = mid; }
  const p = pts[lo > 0 && Math.abs(pts[lo - 1].t - t) < Math.abs(pts[lo].t - t) ? lo - 1 : lo];
  const lines = [`frame ${p.frame} · ${indexText(p.index)} · ${p.t.toFixed(2)} s`];
  for (const [key, label] of [...spec.left, ...(spec.right || [])]) lines.push(`${label}: ${fmt(p[key], 4)}`);
  tip.textContent = lines.join("\n");
  tip.style.left = `${ev.clientX + 14}px`;
  tip.style.top = `${ev.clientY + 10}px`;
  tip.hidden = false;
}

// -- the live frame -----------------------------------------------------------------------------------

function maybeRefreshFrame() {
  if (performance.now() - S.frameAt >= FRAME_PERIOD_MS) refreshFrame();
}

async function refreshFrame() {
  if (S.frameBusy) return;
  S.frameBusy = true;
  S.frameAt = performance.now();
  try {
    const r = await request("GET", "/frames/latest.png", undefined, { raw: true });
    const index = JSON.parse(r.headers.get("X-Index") || "{}");
    noteIndex(index, index.channel);
    if (!picked(index)) return;  // keep the last frame of the picked position and channel
    const frame = Number(r.headers.get("X-Frame")), acquisition = r.headers.get("X-Acquisition");
    const bitmap = await createImageBitmap(await r.blob());
    const inferred = !S.inferredChannels.size || S.inferredChannels.has(index.c);
    const result = !$("overlay").checked ? null : inferred ? await resultOf(acquisition, frame)
      : { frame, localizations: null };
    drawFrame(bitmap, frame, index, result);
  } catch (e) {
    if (e.status !== 404) $("frame-caption").textContent = e.message;
  } finally {
    S.frameBusy = false;
  }
}

async function resultOf(acquisition, frame) {
  // the frame's own localizations: its result comes a few ms after the frame, or never (skipped, another channel)
  for (const waitMs of [0, 150, 400]) {
    if (waitMs) await new Promise((resolve) => setTimeout(resolve, waitMs));
    try {
      return await request("GET", `/results/${frame}?acquisition=${encodeURIComponent(acquisition)}`);
    } catch (e) {
      if (e.status !== 404) return null;
    }
  }
  return { frame, localizations: null };
}

function drawFrame(bitmap, frame, index, result) {
  const c = $("frame"), g = c.getContext("2d");
  const scale = Math.min(c.width / bitmap.width, c.height / bitmap.height);
  const w = bitmap.width * scale, h = bitmap.height * scale, ox = (c.width - w) / 2, oy = (c.height - h) / 2;
  g.fillStyle = "#000";
  g.fillRect(0, 0, c.width, c.height);
  g.imageSmoothingEnabled = false;
  g.drawImage(bitmap, ox, oy, w, h);
  let caption = `frame ${frame} · ${indexText(index)}${index.channel ? ` (${index.channel})` : ""} · ` +
    `${bitmap.width}×${bitmap.height} px, auto-contrast 0.5–99.5 %`;
  if (S.fieldNm) scaleBar(g, (S.fieldNm[2] - S.fieldNm[0]) / bitmap.width / scale, c.width, c.height);
  if (result && !result.localizations) caption += " · no inference result for this frame (skipped, or a channel the models do not read)";
  if (result && result.localizations && S.fieldNm) {
    const pxNm = (S.fieldNm[2] - S.fieldNm[0]) / bitmap.width;
    g.strokeStyle = "#4fd8e8";
    g.lineWidth = 1.5;
    for (const loc of result.localizations) {
      g.beginPath();
      g.arc(ox + (loc.x_nm / pxNm) * scale, oy + (loc.y_nm / pxNm) * scale, Math.max(5, 1.2 * scale), 0, 2 * Math.PI);
      g.stroke();
    }
    caption += ` · ${result.localizations.length} localizations`;
  }
  $("frame-caption").textContent = caption;
}

function scaleBar(g, nmPerCanvasPx, width, height) {
  const target = nmPerCanvasPx * width * 0.2;
  const nice = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000].filter((v) => v <= target).pop() || 10;
  const len = nice / nmPerCanvasPx;
  g.fillStyle = "#fff";
  g.fillRect(width - 16 - len, height - 20, len, 4);
  g.font = "12px system-ui, sans-serif";
  g.textAlign = "right";
  g.fillText(nice >= 1000 ? `${nice / 1000} µm` : `${nice} nm`, width - 16, height - 26);
  g.textAlign = "left";
}

// -- the super-resolution image: rendered on the server from the run's localizations ------------------

function srView() {
  return S.view || S.fieldNm;
}

async function refreshSR() {
  if (!S.srRun) return;
  if (S.srBusy) { S.srAgain = true; return; }
  S.srBusy = true;
  S.srAt = performance.now();
  const c = $("sr");
  const finest = Math.max(1, Number($("sr-pixel").value) || 10);
  const q = new URLSearchParams();
  const view = srView();
  q.set("pixel_nm", view ? Math.max(finest, (view[2] - view[0]) / c.width).toFixed(2) : finest);
  if (view) ["x0_nm", "y0_nm", "x1_nm", "y1_nm"].forEach((k, i) => q.set(k, view[i].toFixed(1)));
  if ($("sr-z").checked) q.set("colour_by_z", "true");
  if ($("pick-p").value !== "") q.set("position", $("pick-p").value);
  if ($("pick-c").value !== "") q.set("channel", $("pick-c").value);
  try {
    const r = await request("GET", `/acquisitions/${S.srRun}/render.png?${q}`, undefined, { raw: true });
    S.fieldNm = r.headers.get("X-Field-Nm").split(",").map(Number);
    S.srImage = {
      bitmap: await createImageBitmap(await r.blob()), extent: r.headers.get("X-Extent-Nm").split(",").map(Number),
      n: Number(r.headers.get("X-Localizations")), pixelNm: Number(r.headers.get("X-Pixel-Nm")),
    };
    drawSR();
  } catch (e) {
    $("sr-caption").textContent = e.message;
  } finally {
    S.srBusy = false;
    if (S.srAgain) { S.srAgain = false; refreshSR(); }
  }
}

function drawSR() {
  const c = $("sr"), g = c.getContext("2d"), view = srView(), img = S.srImage;
  g.fillStyle = "#000";
  g.fillRect(0, 0, c.width, c.height);
  if (!img || !view) return;
  const nmPerPx = Math.max((view[2] - view[0]) / c.width, (view[3] - view[1]) / c.height);
  const X = (nm) => (nm - view[0]) / nmPerPx, Y = (nm) => (nm - view[1]) / nmPerPx;
  g.imageSmoothingEnabled = true;
  g.drawImage(img.bitmap, X(img.extent[0]), Y(img.extent[1]), (img.extent[2] - img.extent[0]) / nmPerPx,
              (img.extent[3] - img.extent[1]) / nmPerPx);
  scaleBar(g, nmPerPx, c.width, c.height);
  const run = S.srRun === S.run ? "" : ` · run ${S.srRun}`;
  $("sr-caption").textContent = `${img.n.toLocaleString()} localizations · rendered at ${img.pixelNm.toFixed(1)} nm/px` +
    `${$("sr-z").checked ? " · colour: z" : ""}${run} · wheel: zoom, drag: pan`;
}

function setupSRInteraction() {
  const c = $("sr");
  let drag = null, timer = null;
  const later = () => { clearTimeout(timer); timer = setTimeout(refreshSR, 150); };
  const toNm = (ev) => {
    const rect = c.getBoundingClientRect(), view = srView();
    const nmPerCss = Math.max((view[2] - view[0]) / rect.width, (view[3] - view[1]) / rect.height);
    return [view[0] + (ev.clientX - rect.left) * nmPerCss, view[1] + (ev.clientY - rect.top) * nmPerCss, nmPerCss];
  };
  c.addEventListener("wheel", (ev) => {
    const view = srView();
    if (!view) return;
    ev.preventDefault();
    const [mx, my] = toNm(ev), k = ev.deltaY > 0 ? 1.25 : 0.8;
    S.view = [mx - (mx - view[0]) * k, my - (my - view[1]) * k, mx + (view[2] - mx) * k, my + (view[3] - my) * k];
    drawSR();
    later();
  }, { passive: false });
  c.addEventListener("mousedown", (ev) => {
    if (!srView()) return;
    drag = { x: ev.clientX, y: ev.clientY, view: [...srView()], nmPerCss: toNm(ev)[2] };
    c.classList.add("dragging");
  });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const dx = (ev.clientX - drag.x) * drag.nmPerCss, dy = (ev.clientY - drag.y) * drag.nmPerCss;
    S.view = [drag.view[0] - dx, drag.view[1] - dy, drag.view[2] - dx, drag.view[3] - dy];
    drawSR();
  });
  window.addEventListener("mouseup", () => {
    if (!drag) return;
    drag = null;
    c.classList.remove("dragging");
    later();
  });
  $("sr-reset").addEventListener("click", () => { S.view = null; refreshSR(); });
  $("sr-pixel").addEventListener("change", refreshSR);
  $("sr-z").addEventListener("change", refreshSR);
}

// -- control ------------------------------------------------------------------------------------------

function enableControls() {
  const live = S.state === "acquiring" || S.state === "paused";
  $("start").disabled = LIVE_STATES.has(S.state);
  $("pause").disabled = S.state !== "acquiring";
  $("resume").disabled = S.state !== "paused";
  $("stop").disabled = !live;
}

async function start(ev) {
  ev.preventDefault();
  const form = ev.target, body = {};
  const mda = $("mda").value.trim();
  if (mda) {
    try { body.sequence = JSON.parse(mda); } catch (e) { say("control-msg", `MDA sequence is not JSON: ${e.message}`); return; }
  } else {
    for (const key of ["frames", "interval_ms"]) if (form.elements[key].value) body[key] = Number(form.elements[key].value);
  }
  if (form.elements.exposure_ms.value) body.exposure_ms = Number(form.elements.exposure_ms.value);
  if (form.elements.name.value) body.name = form.elements.name.value;
  try {
    const run = await request("POST", "/acquisitions", body, { write: true });
    say("control-msg", `started run ${run.id}: ${run.frames_requested} frames`, true);
    newRun(run.id);
  } catch (e) {
    say("control-msg", e.message);
  }
}

async function act(what) {
  try {
    const run = await request("POST", `/acquisitions/current/${what}`, undefined, { write: true });
    say("control-msg", `${what}: run ${run.id} is ${run.state} (${run.frames_acquired} frames)`, true);
  } catch (e) {
    say("control-msg", e.message);
  }
}

// -- policies -----------------------------------------------------------------------------------------

function paramInput(policy, key, value, schema) {
  const input = document.createElement("input");
  const type = schema?.type;
  input.dataset.key = key;
  input.dataset.kind = type === "number" || type === "integer" ? "number" : type === "boolean" ? "boolean" : "json";
  if (input.dataset.kind === "number") { input.type = "number"; input.step = "any"; input.value = value; }
  else if (input.dataset.kind === "boolean") { input.type = "checkbox"; input.checked = Boolean(value); }
  else { input.type = "text"; input.value = JSON.stringify(value); }
  input.title = schema?.description || key;
  input.addEventListener("input", () => { input.dataset.dirty = "1"; });
  return input;
}

function readParam(input) {
  if (input.dataset.kind === "boolean") return input.checked;
  if (input.dataset.kind === "number") return input.value === "" ? null : Number(input.value);
  try { return JSON.parse(input.value); } catch { return input.value; }
}

function setParam(input, value) {
  if (input.dataset.dirty || document.activeElement === input) return;
  if (input.dataset.kind === "boolean") input.checked = Boolean(value);
  else if (input.dataset.kind === "number") input.value = value;
  else input.value = JSON.stringify(value);
}

async function refreshPolicies() {
  let list;
  try { list = await request("GET", "/policies"); } catch { return; }
  const box = $("policies");
  S.setPoint = null;
  for (const pol of list) {
    if (pol.enabled && pol.params.set_point_emitters != null && S.setPoint == null) S.setPoint = pol.params.set_point_emitters;
    let div = box.querySelector(`[data-policy="${pol.name}"]`);
    if (!div) {
      div = document.createElement("div");
      div.className = "policy";
      div.dataset.policy = pol.name;
      const head = document.createElement("div");
      const toggle = document.createElement("input");
      toggle.type = "checkbox";
      toggle.className = "enabled";
      toggle.addEventListener("change", () => updatePolicy(pol.name, { enabled: toggle.checked }, toggle));
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = pol.name;
      const label = document.createElement("label");
      label.append(toggle, " ", name);
      const acts = document.createElement("span");
      acts.className = "muted";
      acts.textContent = `→ ${pol.actuators.join(", ")}`;
      head.append(label, acts);
      const params = document.createElement("div");
      params.className = "params";
      for (const [key, value] of Object.entries(pol.params)) {
        const l = document.createElement("label");
        l.append(`${key} `, paramInput(pol.name, key, value, pol.params_schema?.properties?.[key]));
        params.append(l);
      }
      const apply = document.createElement("button");
      apply.type = "button";
      apply.textContent = "Apply";
      apply.addEventListener("click", () => {
        const changed = {};
        for (const input of params.querySelectorAll("input[data-dirty]")) changed[input.dataset.key] = readParam(input);
        if (!Object.keys(changed).length) { say("policy-msg", `${pol.name}: no parameter was changed`); return; }
        updatePolicy(pol.name, { params: changed });
      });
      if (Object.keys(pol.params).length) params.append(apply);
      const more = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = `parameters (${Object.keys(pol.params).length})`;
      more.append(summary, params);
      div.append(head, more);
      box.append(div);
    }
    const toggle = div.querySelector("input.enabled");
    if (document.activeElement !== toggle) toggle.checked = pol.enabled;
    for (const input of div.querySelectorAll(".params input")) setParam(input, pol.params[input.dataset.key]);
  }
}

async function updatePolicy(name, body, toggle) {
  try {
    const pol = await request("PATCH", `/policies/${name}`, body, { write: true });
    const what = body.enabled !== undefined ? (pol.enabled ? "enabled" : "disabled") : "parameters applied";
    say("policy-msg", `${name}: ${what}`, true);
    for (const input of document.querySelectorAll(`[data-policy="${name}"] .params input`)) delete input.dataset.dirty;
  } catch (e) {
    if (toggle) toggle.checked = !toggle.checked;  // the change did not happen
    say("policy-msg", `${name}: ${e.message}`);
  }
  refreshPolicies();
}

// -- status, workers, runs ----------------------------------------------------------------------------

async function refreshStatus() {
  let st;
  try { st = await request("GET", "/status"); } catch { return; }
  const hold = $("hold");
  hold.hidden = !st.hold;
  hold.textContent = st.hold ? `safe hold: ${st.hold}` : "";
  const rows = Object.entries(st.workers || {}).map(([id, w]) => {
    const tr = document.createElement("tr");
    const lat = st.latency_ms ? `${fmt(st.latency_ms.p50)} ms (run)` : "";
    for (const text of [id, w.host, w.provider, w.state, lat, `${w.results} results · ${w.frames_skipped} skipped`]) {
      tr.insertCell().textContent = text ?? "";
    }
    return tr;
  });
  $("workers").tBodies[0].replaceChildren(...rows);
}

async function refreshRuns() {
  let runs;
  try { runs = await request("GET", "/acquisitions"); } catch { return; }
  const rows = runs.slice().reverse().map((run) => {
    const tr = document.createElement("tr");
    const s = run.summary || {};
    const name = run.out_dir.split(/[\\/]/).pop();
    const lat = s.latency_ms ? `${fmt(s.latency_ms.p50)} / ${fmt(s.latency_ms.p99)} ms` : "";
    for (const text of [name === run.id ? run.id : `${name} (${run.id})`, run.state,
      `${run.frames_acquired} / ${run.frames_requested}`, fmt(s.localizations), lat]) tr.insertCell().textContent = text ?? "";
    const links = tr.insertCell();
    const link = (label, fn) => {
      const a = document.createElement("a");
      a.href = "#";
      a.textContent = label;
      a.addEventListener("click", (ev) => { ev.preventDefault(); fn(); });
      links.append(a, " ");
    };
    link("show SR", () => { S.srRun = run.id; S.view = null; refreshSR(); });
    link("SR.tif", () => openAuthed(`/acquisitions/${run.id}/render.tif`, `${run.id}-render.tif`));
    if (!LIVE_STATES.has(run.state)) link("report", () => openAuthed(`/acquisitions/${run.id}/report.png`));
    link("summary", () => openAuthed(`/acquisitions/${run.id}`));
    return tr;
  });
  $("runs").tBodies[0].replaceChildren(...rows);
}

async function openAuthed(path, download) {
  // reads may need the token, which a plain link cannot carry: fetch, then open the file from memory
  try {
    const r = await request("GET", path, undefined, { raw: true });
    const url = URL.createObjectURL(await r.blob());
    const a = document.createElement("a");
    a.href = url;
    if (download) a.download = download; else a.target = "_blank";
    a.click();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (e) {
    banner(`${path}: ${e.message}`);
  }
}

// -- start --------------------------------------------------------------------------------------------

function main() {
  showTokenState();
  $("token-button").addEventListener("click", () => askToken("The daemon's token (SMARTSCOPE_TOKEN), kept for this tab only."));
  $("token-input").addEventListener("keydown", (ev) => {  // Enter means "use it" (the form's first button cancels)
    if (ev.key === "Enter") { ev.preventDefault(); $("token-dialog").close("ok"); }
  });
  $("start-form").addEventListener("submit", start);
  for (const what of ["pause", "resume", "stop"]) $(what).addEventListener("click", () => act(what));
  for (const id of ["pick-p", "pick-c"]) $(id).addEventListener("change", () => { S.plotsDirty = true; schedulePlots(); refreshSR(); });
  $("overlay").addEventListener("change", refreshFrame);
  window.addEventListener("resize", () => { S.plotsDirty = true; schedulePlots(); });
  makePlots();
  setupSRInteraction();
  enableControls();
  connect();
  refreshPolicies();
  refreshStatus();
  refreshRuns();
  setInterval(refreshStatus, 2000);
  setInterval(refreshPolicies, 5000);
  setInterval(() => { if (LIVE_STATES.has(S.state)) refreshRuns(); }, 5000);
  setInterval(() => { if (S.plotsDirty) schedulePlots(); }, 500);
}

main();
