// Digit pad: draw on the canvas (pointer events: mouse, pen, finger) or upload a PNG, JPEG or WebP;
// the image is posted to POST /predict?include=input, so it goes through the server's own MNIST
// normalisation, and the 28x28 image the model was given comes back and is shown beside the answer
// (a preprocessing failure looks different from a model failure).
// URLs are relative ("predict", "model") so the page also works when mounted under a path prefix.
"use strict";

(() => {
  const STROKE = 24; // ~1/12 of the 280px canvas: thick enough to survive scaling to MNIST's 20x20 box
  const DEBOUNCE_MS = 150; // quiet time after the last stroke movement before asking the server
  const MAX_WAIT_MS = 500; // but never more than this while the user keeps drawing
  const INK = "#fff";
  const PAPER = "#000";

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const result = $("result");
  const labelEl = $("label");
  const statusEl = $("status");
  const errorEl = $("error");
  const answeredEl = $("answered");
  const modelEl = $("model");
  const fileInput = $("file");
  const seenEl = $("seen");
  const seenCtx = $("seen-canvas").getContext("2d");
  const rows = Array.from(document.querySelectorAll("#chart tbody tr"));

  let knownVersion = null;
  let drawing = null; // the pointerId drawing now, if any
  let last = null; // the previous point of the current stroke
  let dirty = false; // something has been drawn since the last clear
  let showingUpload = false; // the canvas shows an uploaded image: the next stroke starts afresh
  let timer = 0;
  let firstScheduled = 0;
  let seq = 0; // the latest request wins; older answers are dropped
  let inFlight = null;

  // ---------------------------------------------------------------------------------------------
  // Canvas

  function blank() {
    ctx.globalCompositeOperation = "source-over";
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    dirty = false;
    showingUpload = false;
  }

  function point(event) {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  }

  function dot(p) {
    ctx.fillStyle = INK;
    ctx.beginPath();
    ctx.arc(p.x, p.y, STROKE / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function segment(a, b) {
    ctx.strokeStyle = INK;
    ctx.lineWidth = STROKE;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    if (drawing !== null) return; // a second finger does not start a second stroke
    event.preventDefault();
    if (showingUpload) blank();
    drawing = event.pointerId;
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    dot(last);
    dirty = true;
    schedule(DEBOUNCE_MS);
  });

  canvas.addEventListener("pointermove", (event) => {
    if (event.pointerId !== drawing) return;
    event.preventDefault();
    // Coalesced events keep fast strokes smooth: the browser may batch several moves into one.
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) {
      const p = point(e);
      segment(last, p);
      last = p;
    }
    schedule(DEBOUNCE_MS);
  });

  function endStroke(event) {
    if (event.pointerId !== drawing) return;
    drawing = null;
    last = null;
    schedule(0); // the stroke is finished: no reason to wait
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());

  // ---------------------------------------------------------------------------------------------
  // Requests

  function schedule(delay) {
    const now = performance.now();
    if (!timer) firstScheduled = now;
    clearTimeout(timer);
    setState("pending");
    const wait = Math.max(0, Math.min(delay, firstScheduled + MAX_WAIT_MS - now));
    timer = setTimeout(() => {
      timer = 0;
      predictCanvas();
    }, wait);
  }

  function cancelPending() {
    clearTimeout(timer);
    timer = 0;
    seq += 1;
    if (inFlight) inFlight.abort();
    inFlight = null;
  }

  function predictCanvas() {
    // A cleared canvas is not sent: the server would only answer that the image is blank.
    if (!dirty) return;
    const token = seq;
    canvas.toBlob((blob) => {
      if (token !== seq || !dirty) return; // cleared (or an upload chosen) while encoding
      if (blob) send(blob, "your drawing", "image/png");
      else showError("the browser could not encode the drawing as PNG");
    }, "image/png");
  }

  async function send(body, source, type) {
    const mine = ++seq;
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    setState("pending");
    const started = performance.now();
    let response;
    let payload = null;
    try {
      response = await fetch("predict?include=input", {
        method: "POST",
        headers: { "Content-Type": type, Accept: "application/json" },
        body,
        signal: controller.signal,
      });
      payload = await response.json().catch(() => null);
    } catch (err) {
      if (mine !== seq) return; // superseded (aborted on purpose)
      inFlight = null;
      showError(`could not reach the server (${err.message || err})`);
      return;
    }
    if (mine !== seq) return;
    inFlight = null;
    if (!response.ok) {
      showError(errorText(response, payload));
      return;
    }
    showPrediction(payload, source, performance.now() - started);
  }

  function errorText(response, payload) {
    const detail = payload && payload.detail;
    const text = typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : response.statusText;
    return `The server answered ${response.status}: ${text || "no details"}`;
  }

  // ---------------------------------------------------------------------------------------------
  // Display

  function setState(state) {
    // "pending" also while a newer stroke is waiting for its debounce, so "done" means final.
    if (state === "done" && timer) state = "pending";
    result.dataset.state = state;
    result.setAttribute("aria-busy", state === "pending" ? "true" : "false");
  }

  function showSeen(input) {
    // input.pixels: the 784 values in [0, 1] the model was given, row by row (white digit on black).
    const pixels = input && input.pixels;
    if (!Array.isArray(pixels) || pixels.length !== 784) {
      seenEl.hidden = true;
      return;
    }
    const image = seenCtx.createImageData(28, 28);
    pixels.forEach((value, i) => {
      const v = Math.round(255 * Math.min(1, Math.max(0, value)));
      image.data.set([v, v, v, 255], 4 * i);
    });
    seenCtx.putImageData(image, 0, 0);
    seenEl.hidden = false;
  }

  function resetChart() {
    seenEl.hidden = true;
    for (const row of rows) {
      row.classList.remove("top");
      row.querySelector(".fill").style.width = "0";
      row.querySelector(".pct").textContent = "–";
    }
  }

  function showPrediction(payload, source, elapsed) {
    const probs = payload.probabilities;
    const label = payload.label;
    errorEl.hidden = true;
    errorEl.textContent = "";
    rows.forEach((row, digit) => {
      const p = probs[digit];
      row.classList.toggle("top", digit === label);
      row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
      row.querySelector(".pct").textContent = percent(p);
    });
    labelEl.textContent = String(label);
    showSeen(payload.input);
    statusEl.textContent = `Predicted ${label} with probability ${percent(probs[label])} (from ${source}).`;
    answeredEl.textContent = `Answered by model ${payload.model_version} in ${Math.round(elapsed)} ms.`;
    if (payload.model_version !== knownVersion) loadModelInfo(); // a reload happened: refresh the header
    setState("done");
  }

  function showError(message) {
    resetChart();
    labelEl.textContent = "?";
    statusEl.textContent = "No prediction: see the message below.";
    answeredEl.textContent = "";
    errorEl.textContent = message;
    errorEl.hidden = false;
    setState("error");
  }

  function showEmpty() {
    resetChart();
    labelEl.textContent = "–";
    statusEl.textContent = "Draw a digit to see what the model thinks.";
    answeredEl.textContent = "";
    errorEl.hidden = true;
    errorEl.textContent = "";
    setState("empty");
  }

  function percent(p) {
    return `${(100 * p).toFixed(1)}%`;
  }

  async function loadModelInfo() {
    try {
      const response = await fetch("model", { headers: { Accept: "application/json" } });
      const info = await response.json().catch(() => null);
      if (!response.ok || !info) {
        modelEl.textContent = `Model information unavailable (${errorText(response, info)}).`;
        return;
      }
      knownVersion = info.version;
      const accuracy =
        typeof info.test_accuracy === "number" ? `${(100 * info.test_accuracy).toFixed(2)}%` : "not recorded";
      modelEl.textContent = `Model ${info.version} · test accuracy ${accuracy}`;
    } catch (err) {
      modelEl.textContent = `Model information unavailable (${err.message || err}).`;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Buttons

  $("clear").addEventListener("click", () => {
    cancelPending();
    blank();
    showEmpty();
  });

  $("upload").addEventListener("click", () => fileInput.click());

  fileInput.addEventListener("change", async () => {
    const file = fileInput.files && fileInput.files[0];
    fileInput.value = ""; // choosing the same file again must fire "change" again
    if (!file) return;
    cancelPending();
    blank();
    showingUpload = true;
    // The server judges the file: it is sent as it is, with its own type (a PNG, JPEG or WebP),
    // and anything else gets the server's own message about it.
    send(file, file.name, file.type || "application/octet-stream");
    await preview(file);
  });

  async function preview(file) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      return; // not an image the browser can show; the server's answer says why
    }
    if (!showingUpload) return; // the user started drawing meanwhile
    const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    bitmap.close();
  }

  blank();
  showEmpty();
  loadModelInfo();
})();
