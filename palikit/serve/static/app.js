// palikit web demo: pick an image and a task, POST it to the native /v1/<task> endpoint, draw the answer.
// Plain JS, no build step. Boxes come in image pixels; masks as COCO compressed RLE (decoded below).
"use strict";

// palikit.overlay's colour rule, computed the same way (tests/test_web_demo.py compares the two): a
// label's crc32 picks one of HUES, an object's index among its label's objects a lightness of that hue.
const HUES = 12, SATURATION = 0.75, SHADES = [0.45, 0.3, 0.6, 0.38, 0.52];
const splitLabels = (v) => v.split(";").map((s) => s.trim()).filter(Boolean);
// The server's task registry (GET /tasks): each task's route, menu title, text field and token budget.
let TASKS = {};

const $ = (id) => document.getElementById(id);
const canvas = $("view");
const ctx = canvas.getContext("2d");
let image = null;     // HTMLImageElement of the chosen file (a clip's: its first frame)
let imageURL = null;  // the same file as a data: URL, which is what the API takes
let clipURL = null;   // a chosen clip as a data: URL (sent as "video"; image then shows its first frame)
let maxFrames = 16;   // the clip frames that fit the server's rows (GET /health), at most big_vision's 16

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function updateTask() {
  const t = TASKS[$("task").value];
  if (!t) return;
  $("arg").value = "";  // one task's labels are not another's question
  $("arg-row").hidden = t.arg === null;
  $("arg-label").textContent = t.arg ? t.arg.title : "";
  $("arg").placeholder = t.arg ? t.arg.example : "";
  $("max-tokens").value = "";  // empty: the server's budget for the prompt (more for more labels)
  $("max-tokens").placeholder = `${t.max_new_tokens} (the task's)`;
}

// What the task's text field puts in the request body: a list for labels, nothing when left empty.
function fields(t, value) {
  if (!t.arg || !value) return {};
  return { [t.arg.name]: t.arg.many ? splitLabels(value) : value };
}

async function loadTasks() {
  const list = await (await fetch("/tasks")).json();
  TASKS = Object.fromEntries(list.map((t) => [t.verb, t]));
  $("task").replaceChildren(...list.map((t) => new Option(t.title, t.verb)));
  updateTask();
}

let loads = 0;  // loadFile calls so far: only the latest one's image is shown

function loadFile(file, note = "") {
  if (!file) return;
  const n = ++loads;
  $("run").disabled = true;  // until this file is read: Run must not send the one before
  const reader = new FileReader();
  const unreadable = () => {
    if (n !== loads) return;
    image = imageURL = clipURL = null;  // a Run now would answer about the old image, as if about this file
    $("clip").hidden = $("frames-row").hidden = true;
    clearResult();
    canvas.width = canvas.height = 0;
    setStatus(`${file.name} is not an image the browser can read (PNG, JPEG, WebP, GIF...): choose another`,
              true);
  };
  reader.onerror = unreadable;
  if (file.type.startsWith("video/")) {
    reader.onload = () => loadClip(reader.result, file.name, n, note, unreadable);
    reader.readAsDataURL(file);
    return;
  }
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      if (n !== loads) return;
      image = img;
      imageURL = reader.result;
      clipURL = null;
      $("clip").hidden = $("frames-row").hidden = true;
      clearResult();
      $("run").disabled = false;
      setStatus(`${file.name}: ${img.naturalWidth}x${img.naturalHeight}${note}`);
    };
    img.onerror = unreadable;
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// A clip: played above the canvas, which shows its first frame (boxes are drawn there); sent whole.
function loadClip(url, name, n, note, unreadable) {
  const clip = $("clip");
  clip.onerror = unreadable;
  clip.onloadeddata = async () => {
    if (n !== loads) return;
    await seek(clip, 0);
    const first = new Image();
    first.onload = () => {
      if (n !== loads) return;
      image = first;
      imageURL = null;
      clipURL = url;
      clip.hidden = $("frames-row").hidden = false;
      clearResult();
      $("run").disabled = false;
      setStatus(`${name}: ${clip.videoWidth}x${clip.videoHeight}, ${clip.duration.toFixed(1)} s${note}`);
    };
    first.src = still(clip, clip.videoWidth, clip.videoHeight).toDataURL();
  };
  clip.src = url;
}

// The clip at time t (seconds), once the browser has it.
function seek(clip, t) {
  return new Promise((done) => {
    if (Math.abs(clip.currentTime - t) < 1e-3 && clip.readyState >= 2) return done();
    clip.addEventListener("seeked", () => done(), { once: true });
    clip.currentTime = t;
  });
}

function still(clip, w, h) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  c.getContext("2d").drawImage(clip, 0, 0, w, h);
  return c;
}

// The frames the model saw, each with its time, under the answer.
async function showFrames(times) {
  const clip = $("clip"), row = $("frames");
  row.replaceChildren();
  for (const t of times) {
    await seek(clip, t + 1e-3);  // just past the frame's start: that frame, not the one before
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = `${t.toFixed(2)} s`;
    figure.append(still(clip, clip.videoWidth, clip.videoHeight), caption);
    row.append(figure);
  }
}

// zlib's crc32 of the label's UTF-8, as palikit.overlay hashes it.
function crc32(text) {
  let c = ~0;
  for (const byte of new TextEncoder().encode(text)) {
    c ^= byte;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return ~c >>> 0;
}

// palikit.overlay._hsl, operation for operation, so that both round alike.
function hsl(hue, s, lightness) {
  const c = (1 - Math.abs(2 * lightness - 1)) * s;
  const x = c * (1 - Math.abs((hue / 60) % 2 - 1));
  const m = lightness - c / 2;
  const rgb = [[c, x, 0], [x, c, 0], [0, c, x], [0, x, c], [x, 0, c], [c, 0, x]][Math.floor(hue / 60) % 6];
  return "#" + rgb.map((v) => Math.floor((v + m) * 255 + 0.5).toString(16).padStart(2, "0")).join("");
}

// Each object's colour: shades of one hue for one label (palikit.overlay.colours).
function colours(labels) {
  const seen = {};
  return labels.map((label) => {
    const k = seen[label] || 0;
    seen[label] = k + 1;
    return hsl((crc32(label) % HUES) * (360 / HUES), SATURATION, SHADES[k % SHADES.length]);
  });
}

// Text colour on a `colour` background: black on the light shades, white on the dark (palikit.overlay._ink).
function ink(colour) {
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16));
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000" : "#fff";
}

// COCO compressed RLE counts -> run lengths (pycocotools' rleFrString). Arithmetic, not bit operators:
// JS bit operators are 32-bit and counts of large images need more.
function rleCounts(s) {
  const counts = [];
  let x = 0, shift = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i) - 48;
    x += (c & 0x1f) * 2 ** shift;
    shift += 5;
    if (c & 0x20) continue;       // more chunks follow
    if (c & 0x10) x -= 2 ** shift;  // negative: sign-extend
    counts.push(counts.length > 2 ? x + counts[counts.length - 2] : x);
    x = 0;
    shift = 0;
  }
  return counts;
}

// A tinted, half-transparent image of a mask; runs go down the columns, starting with zeros.
function maskLayer(rle, colour) {
  const [h, w] = rle.size;
  const layer = new ImageData(w, h);
  const rgb = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16));
  let start = 0;
  rleCounts(rle.counts).forEach((n, i) => {
    if (i % 2) {
      for (let k = start; k < start + n; k++) {
        const p = ((k % h) * w + Math.floor(k / h)) * 4;
        layer.data.set([...rgb, 115], p);
      }
    }
    start += n;
  });
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  c.getContext("2d").putImageData(layer, 0, 0);
  return c;
}

// White diagonal stripes, `width` canvas pixels wide, over a mask layer drawn at canvas size: a tint alone
// vanishes over a shape of its own colour. Striped on the canvas, not the image: a 96 px image's stripes
// would be 7 canvas pixels wide.
function maskStripes(layer, width) {
  const w = Math.max(1, Math.round(width)), tile = document.createElement("canvas");
  tile.width = tile.height = 5 * w;
  const stripes = new ImageData(5 * w, 5 * w);
  for (let p = 0; p < 25 * w * w; p++) {
    const x = p % (5 * w), y = Math.floor(p / (5 * w));
    if ((x + y) % (5 * w) < w) stripes.data.set([255, 255, 255, 255], p * 4);
  }
  tile.getContext("2d").putImageData(stripes, 0, 0);
  const c = document.createElement("canvas");
  c.width = canvas.width;
  c.height = canvas.height;
  const g = c.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(layer, 0, 0, c.width, c.height);
  g.globalCompositeOperation = "source-in";  // the stripes where the mask is, at the mask's alpha
  g.fillStyle = g.createPattern(tile, "repeat");
  g.fillRect(0, 0, c.width, c.height);
  return c;
}

// The canvas has the pixels it is shown with (not the image's: a 96 px image would get labels 7x too big),
// so boxes and labels are drawn at screen resolution over the scaled image. scale: canvas px per image px.
function fitCanvas() {
  const ratio = window.devicePixelRatio || 1;
  const shown = Math.min(canvas.parentElement.clientWidth || image.naturalWidth, 720);
  canvas.width = Math.round(shown * ratio);
  canvas.height = Math.round((shown * ratio * image.naturalHeight) / image.naturalWidth);
  canvas.dataset.scale = canvas.width / image.naturalWidth;
  ctx.imageSmoothingEnabled = canvas.width < image.naturalWidth;  // enlarged: each pixel a crisp square
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  return { scale: canvas.width / image.naturalWidth, ratio };
}

function clearResult() {
  if (image) fitCanvas();
  $("text").textContent = "";
  $("objects").replaceChildren();
  $("frames").replaceChildren();
}

function draw(objects) {
  const { scale, ratio } = fitCanvas();
  const list = $("objects");
  list.replaceChildren();
  const lineWidth = 2 * ratio, fontSize = Math.round(13 * ratio), th = fontSize + 4 * ratio;
  const palette = colours(objects.map((o) => o.label));
  objects.forEach((o, i) => {
    const colour = palette[i];
    if (o.mask) {
      const layer = maskLayer(o.mask, colour);
      ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
      ctx.drawImage(maskStripes(layer, lineWidth), 0, 0);
    }
    const [x1, y1, x2, y2] = o.box.map(Math.round);  // image pixels, for the list
    // Scaled, then rounded: rounding first would move a side by up to half an image pixel, 4 canvas
    // pixels on a 96 px image.
    const [cx1, cy1, cx2, cy2] = o.box.map((v) => Math.round(v * scale));
    ctx.strokeStyle = colour;
    ctx.lineWidth = lineWidth;
    ctx.strokeRect(cx1, cy1, cx2 - cx1, cy2 - cy1);
    const caption = o.confidence == null ? o.label : `${o.label} ${o.confidence.toFixed(2)}`;
    const li = document.createElement("li");
    if (caption) {
      ctx.font = `${fontSize}px sans-serif`;
      const tw = Math.min(ctx.measureText(caption).width + 6 * ratio, canvas.width);  // fillText squeezes to fit
      // Above the box, else below it, else (a box filling the image) inside its top: never over the
      // object when there is room around it, and always inside the image.
      const ty = cy1 - lineWidth >= th ? cy1 - lineWidth - th
        : cy2 + lineWidth + th <= canvas.height ? cy2 + lineWidth : cy1 + lineWidth;
      const tx = Math.max(0, Math.min(cx1, canvas.width - tw));
      ctx.fillStyle = colour;
      ctx.fillRect(tx, ty, tw, th);
      ctx.fillStyle = ink(colour);
      ctx.fillText(caption, tx + 3 * ratio, ty + th - 4 * ratio, tw - 6 * ratio);
      li.dataset.label = [tx, ty, tx + tw, ty + th].map(Math.round).join(",");  // canvas pixels
    }
    li.dataset.box = [x1, y1, x2, y2].join(",");
    li.dataset.color = colour;
    li.innerHTML = `<span class="swatch" style="background:${colour}"></span>`;
    li.append(`${caption || "(no label)"}: [${[x1, y1, x2, y2].join(", ")}]${o.mask ? " + mask" : ""}`);
    list.append(li);
  });
}

async function run() {
  const task = $("task").value;
  const t = TASKS[task];
  const arg = $("arg").value.trim();
  if (t.arg && t.arg.required && !arg) {
    setStatus(`${t.arg.title} is needed for this task`, true);
    return;
  }
  const headers = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const body = clipURL ? { video: clipURL, frames: Number($("frames").value) || maxFrames, ...fields(t, arg) }
    : { image: imageURL, ...fields(t, arg) };
  const budget = Number($("max-tokens").value);
  if (budget) body.max_new_tokens = budget;
  if ($("adapter").value) body.adapter = $("adapter").value;
  $("run").disabled = true;
  setStatus("running...");
  const started = performance.now();
  try {
    const r = await fetch(`/v1/${task}`, { method: "POST", headers, body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({ error: { message: `HTTP ${r.status}` } }));
    if (!r.ok) throw new Error(data.error ? data.error.message : `HTTP ${r.status}`);
    $("text").textContent = data.text;
    draw(data.objects || []);
    if (data.frame_times) await showFrames(data.frame_times);
    const n = (data.objects || []).length;
    const found = data.objects ? `, ${n} object${n === 1 ? "" : "s"}` : "";
    setStatus(`done in ${((performance.now() - started) / 1000).toFixed(2)} s${found}`);
  } catch (e) {
    clearResult();  // an old answer must not look like this request's
    setStatus(e.message, true);
  } finally {
    $("run").disabled = !image;
  }
}

async function init() {
  $("task").addEventListener("change", updateTask);
  $("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
  $("run").addEventListener("click", run);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    loadFile(e.dataTransfer.files[0]);
  });
  $("key").value = sessionStorage.getItem("palikit-key") || "";
  $("key").addEventListener("change", () => sessionStorage.setItem("palikit-key", $("key").value));
  try {
    await loadTasks();
    const health = await (await fetch("/health")).json();
    $("model").textContent = health.model;
    // frames x image tokens + the prompt and answer's room must fit one of the server's rows
    maxFrames = Math.max(1, Math.min(16, Math.floor((health.max_len - 128) / health.image_tokens)));
    $("frames").placeholder = `${maxFrames}`;
    const models = [new Option(`${health.model} (base)`, ""), ...(health.adapters || []).map((a) => new Option(a, a))];
    $("adapter").replaceChildren(...models);
    $("adapter-row").hidden = models.length < 2;
    $("key-row").hidden = !health.auth;
    const sample = await (await fetch("/sample.png")).blob();
    if (!loads) loadFile(new File([sample], "sample.png"), " (a sample: drop or choose your own)");
  } catch (e) {
    setStatus("cannot reach the server", true);
  }
}

init();
