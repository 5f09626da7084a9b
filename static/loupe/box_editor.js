// Box editor of a detection head (issue 18.2), plain JS. The photo and an SVG overlay sit in one "stage" in image
// pixels; zoom and pan are one CSS transform of the stage, so boxes stay aligned at every zoom and a zoom touches no
// box. Each box is one <g> (rect + text) updated in place when that box changes; drags are applied once per
// animation frame. The set is read and saved whole over REST (GET/PUT …/boxes/<head>/ with the version seen): a
// stale save (409) overwrites nothing and offers the current boxes, a refused one (400) shows the server's message.
// Ctrl+Z undoes unsaved edits in the page; with none left it asks the server to undo the last saved change
// (POST …/undo/), only when nobody changed the set since this page loaded it.
(function () {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#22c55e", "#f59e0b", "#06b6d4", "#e11d48", "#a855f7", "#84cc16", "#f97316", "#0ea5e9", "#ec4899"];
  const HANDLES = ["nw", "n", "ne", "e", "se", "s", "sw", "w"];
  const MAX_SCALE = 40;
  const HISTORY = 200;

  function BoxEditor(root) {
    const W = Number(root.dataset.width);
    const H = Number(root.dataset.height);
    const api = root.dataset.api;
    const viewport = root.querySelector(".be-viewport");
    const stage = root.querySelector(".be-stage");
    const svg = root.querySelector(".be-svg");
    const layer = root.querySelector(".be-boxes");
    const handlesG = root.querySelector(".be-handles");
    const draft = root.querySelector(".be-draft");
    const picker = root.querySelector(".be-class");
    const statusEl = root.querySelector(".be-status");
    const countEl = root.querySelector(".be-count");
    const alertEl = root.querySelector(".be-alert");
    const alertText = root.querySelector(".be-alert-text");
    const reloadBtn = root.querySelector("[data-do=reload]");
    const help = root.querySelector(".be-help");
    const csrf = (root.querySelector("input[name=csrfmiddlewaretoken]") || {}).value || "";

    const classes = Array.from(picker.options).map(function (o, i) {
      return { id: Number(o.value), name: o.textContent.replace(/^\d /, ""), color: COLORS[i % COLORS.length] };
    });
    const classById = new Map(classes.map(function (c) { return [c.id, c]; }));

    let boxes = []; // {id, x, y, w, h, class_id, source, score, g, rect, text}
    let byId = new Map();
    let nextId = 1;
    let selected = null; // a box
    let version = 0;
    let dirty = false;
    let busy = false;
    let history = []; // snapshots of the set before each unsaved edit
    let lastOp = null; // consecutive nudges of one box are one undo step
    let truncated = false;
    let scale = 1, tx = 0, ty = 0;
    let spaceDown = false;
    let drag = null;
    let frameQueued = false;
    let lastPointer = null;
    const stats = { keys: [], frames: [], drag: [] }; // ms per key handler, key → next frame, drag frame (browser tests)

    // ------------------------------------------------------------------------------------------ drawing
    function classOf(b) {
      return classById.get(b.class_id) || { name: "class " + b.class_id, color: "#999" };
    }

    function label(b) {
      const name = classOf(b).name;
      if (b.source === "model") return (b.score == null ? "?" : b.score.toFixed(2)) + " " + name;
      return b === selected ? name : "";
    }

    function makeEl(b) {
      const g = document.createElementNS(SVG, "g");
      g.setAttribute("class", "be-box");
      const rect = document.createElementNS(SVG, "rect");
      const text = document.createElementNS(SVG, "text");
      text.setAttribute("dominant-baseline", "hanging");
      g.appendChild(rect);
      g.appendChild(text);
      g.dataset.id = b.id;
      b.g = g;
      b.rect = rect;
      b.text = text;
      updateEl(b);
      layer.appendChild(g);
    }

    function updateEl(b) {
      b.rect.setAttribute("x", b.x);
      b.rect.setAttribute("y", b.y);
      b.rect.setAttribute("width", b.w);
      b.rect.setAttribute("height", b.h);
      b.text.setAttribute("x", b.x + 1);
      b.text.setAttribute("y", b.y + 1);
      const text = label(b);
      if (b.text.textContent !== text) b.text.textContent = text;
      b.g.style.setProperty("--c", classOf(b).color);
      b.g.classList.toggle("model", b.source === "model");
      b.g.classList.toggle("sel", b === selected);
    }

    function renderAll() {
      layer.textContent = "";
      boxes.forEach(makeEl);
      updateHandles();
      updateCount();
    }

    function updateHandles() {
      if (!selected) {
        handlesG.setAttribute("visibility", "hidden");
        return;
      }
      if (!handlesG.firstChild) {
        HANDLES.forEach(function (h) {
          const r = document.createElementNS(SVG, "rect");
          r.dataset.h = h;
          handlesG.appendChild(r);
        });
      }
      handlesG.setAttribute("visibility", "visible");
      const b = selected;
      const size = 9 / scale;
      for (const r of handlesG.children) {
        const h = r.dataset.h;
        const x = h.includes("w") ? b.x : h.includes("e") ? b.x + b.w : b.x + b.w / 2;
        const y = h.includes("n") ? b.y : h.includes("s") ? b.y + b.h : b.y + b.h / 2;
        r.setAttribute("x", x - size / 2);
        r.setAttribute("y", y - size / 2);
        r.setAttribute("width", size);
        r.setAttribute("height", size);
      }
    }

    function updateCount() {
      const suggestions = boxes.filter(function (b) { return b.source === "model"; }).length;
      countEl.textContent =
        boxes.length + " boxes" + (suggestions ? " · " + suggestions + " suggestions" : "") +
        " · v" + version + (dirty ? " · unsaved" : "");
      root.dataset.dirty = dirty ? "1" : "";
      root.dataset.version = String(version);
    }

    function say(text) {
      statusEl.textContent = text;
    }

    function describe(b) {
      const order = readingOrder();
      const what = b.source === "model" ? " (suggestion " + (b.score == null ? "?" : b.score.toFixed(2)) + ")" : "";
      return "Box " + (order.indexOf(b) + 1) + " of " + order.length + ": " + classOf(b).name + " at " +
        fmt(b.x) + ", " + fmt(b.y) + ", " + fmt(b.w) + "×" + fmt(b.h) + what;
    }

    function fmt(v) {
      return String(Math.round(v * 10) / 10);
    }

    // ------------------------------------------------------------------------------------------ view
    function applyView() {
      stage.style.transform = "translate(" + tx + "px, " + ty + "px) scale(" + scale + ")";
      svg.style.setProperty("--k", String(1 / scale));
      updateHandles();
    }

    function fitScale() {
      return Math.min(viewport.clientWidth / W, viewport.clientHeight / H) || 1;
    }

    function fit() {
      scale = fitScale();
      tx = (viewport.clientWidth - W * scale) / 2;
      ty = (viewport.clientHeight - H * scale) / 2;
      applyView();
    }

    function zoomAt(factor, px, py) {
      const s = Math.min(MAX_SCALE, Math.max(fitScale() / 2, scale * factor));
      const ix = (px - tx) / scale, iy = (py - ty) / scale;
      scale = s;
      tx = px - ix * s;
      ty = py - iy * s;
      applyView();
    }

    function zoomKey(factor) {
      if (selected) {
        const cx = selected.x + selected.w / 2, cy = selected.y + selected.h / 2;
        zoomAt(factor, tx + cx * scale, ty + cy * scale);
        centreOn(selected);
      } else {
        zoomAt(factor, viewport.clientWidth / 2, viewport.clientHeight / 2);
      }
      say("Zoom " + Math.round(scale * 100) + "%");
    }

    function centreOn(b) {
      tx = viewport.clientWidth / 2 - (b.x + b.w / 2) * scale;
      ty = viewport.clientHeight / 2 - (b.y + b.h / 2) * scale;
      applyView();
    }

    function ensureVisible(b) {
      const left = tx + b.x * scale, top = ty + b.y * scale;
      const right = left + b.w * scale, bottom = top + b.h * scale;
      if (left < 0 || top < 0 || right > viewport.clientWidth || bottom > viewport.clientHeight) centreOn(b);
    }

    function visibleRect() {
      const x0 = Math.max(0, -tx / scale), y0 = Math.max(0, -ty / scale);
      const x1 = Math.min(W, (viewport.clientWidth - tx) / scale), y1 = Math.min(H, (viewport.clientHeight - ty) / scale);
      return { x: x0, y: y0, w: Math.max(0, x1 - x0), h: Math.max(0, y1 - y0) };
    }

    function toImage(clientX, clientY) {
      const r = viewport.getBoundingClientRect();
      return { x: (clientX - r.left - tx) / scale, y: (clientY - r.top - ty) / scale };
    }

    // ------------------------------------------------------------------------------------------ set and edits
    function plain(b) {
      return { id: b.id, x: b.x, y: b.y, w: b.w, h: b.h, class_id: b.class_id, source: b.source, score: b.score };
    }

    function setBoxes(list, keepIds) {
      const selId = selected && selected.id;
      boxes = list.map(function (d) {
        return {
          id: keepIds && d.id ? d.id : nextId++,
          x: d.x, y: d.y, w: d.w, h: d.h, class_id: d.class_id, source: d.source || "human",
          score: d.score == null ? null : d.score,
        };
      });
      byId = new Map(boxes.map(function (b) { return [b.id, b]; }));
      selected = keepIds ? byId.get(selId) || null : null;
      renderAll();
    }

    function remember(op) {
      if (op && op === lastOp) return;
      history.push(boxes.map(plain));
      if (history.length > HISTORY) {
        history.shift();
        truncated = true; // the oldest unsaved edit can no longer be undone: the set stays "unsaved" after undos
      }
      lastOp = op || null;
    }

    function changed(b) {
      dirty = true;
      if (b) {
        updateEl(b);
        if (b === selected) updateHandles();
      }
      updateCount();
    }

    function accept(b) {
      b.source = "human"; // a person looked at it: a human box, no model score
      b.score = null;
    }

    function select(b, quiet, keepView) {
      const old = selected;
      selected = b || null;
      lastOp = null;
      if (old) updateEl(old);
      if (selected) {
        updateEl(selected);
        layer.appendChild(selected.g); // on top, so its handles and outline are never hidden by a neighbour
        if (!keepView) ensureVisible(selected);
        if (!quiet) say(describe(selected));
      } else if (!quiet) {
        say("No box selected.");
      }
      updateHandles();
    }

    function readingOrder() {
      // Shelf rows: sort by centre height; a box whose centre is above the row's first box's bottom joins the row;
      // each row left to right.
      const sorted = boxes.slice().sort(function (a, b) { return a.y + a.h / 2 - (b.y + b.h / 2) || a.x - b.x || a.id - b.id; });
      const out = [];
      let row = [], bottom = -Infinity;
      for (const b of sorted) {
        if (row.length && b.y + b.h / 2 <= bottom) {
          row.push(b);
        } else {
          flush();
          row = [b];
          bottom = b.y + b.h;
        }
      }
      flush();
      return out;
      function flush() {
        row.sort(function (a, b) { return a.x - b.x || a.y - b.y || a.id - b.id; });
        out.push.apply(out, row);
      }
    }

    function step(delta, wrap) {
      const order = readingOrder();
      if (!order.length) return null;
      if (!selected) return delta > 0 ? order[0] : order[order.length - 1];
      const i = order.indexOf(selected) + delta;
      if (i < 0 || i >= order.length) return wrap ? order[(i + order.length) % order.length] : null;
      return order[i];
    }

    function nextSuggestion(from) {
      const order = readingOrder();
      const start = from ? order.indexOf(from) : -1;
      for (let k = 1; k <= order.length; k++) {
        const b = order[(start + k) % order.length];
        if (b !== from && b.source === "model") return b;
      }
      return null;
    }

    function clamp(v, lo, hi) {
      return Math.min(hi, Math.max(lo, v));
    }

    function add(x, y, w, h) {
      remember();
      const b = { id: nextId++, x: x, y: y, w: w, h: h, class_id: Number(picker.value), source: "human", score: null };
      boxes.push(b);
      byId.set(b.id, b);
      makeEl(b);
      changed(null);
      select(b, true);
      say("New box. " + describe(b));
      return b;
    }

    function addAtCentre() {
      if (!classes.length) return say("This head has no classes yet; add one first.");
      const v = visibleRect();
      const size = Math.max(4, Math.min(W, H, Math.round(Math.min(v.w, v.h) / 6)));
      const x = clamp(Math.round(v.x + v.w / 2 - size / 2), 0, W - size);
      const y = clamp(Math.round(v.y + v.h / 2 - size / 2), 0, H - size);
      add(x, y, size, size);
    }

    function move(dx, dy) {
      const b = selected;
      remember("move:" + b.id);
      b.x = clamp(b.x + dx, 0, W - b.w);
      b.y = clamp(b.y + dy, 0, H - b.h);
      if (b.source === "model") accept(b);
      changed(b);
      say(describe(b));
    }

    function resize(dw, dh) {
      const b = selected;
      remember("size:" + b.id);
      b.w = clamp(b.w + dw, 1, W - b.x);
      b.h = clamp(b.h + dh, 1, H - b.y);
      if (b.source === "model") accept(b);
      changed(b);
      say(describe(b));
    }

    function setClass(id) {
      picker.value = String(id);
      if (!selected) return say("New boxes: " + classById.get(id).name);
      remember();
      selected.class_id = id;
      if (selected.source === "model") accept(selected);
      changed(selected);
      say(describe(selected));
    }

    function removeBox(b) {
      boxes.splice(boxes.indexOf(b), 1);
      byId.delete(b.id);
      b.g.remove();
      if (selected === b) selected = null;
    }

    function deleteSelected() {
      if (!selected) return say("Select a box first (n, Tab or a click).");
      const b = selected;
      remember();
      removeBox(b);
      changed(null);
      updateHandles();
      say("Deleted " + classOf(b).name + ". " + boxes.length + " boxes left; n selects the next.");
    }

    function acceptSelected() {
      if (!selected || selected.source !== "model") return say("The selected box is not a suggestion.");
      const b = selected;
      remember();
      accept(b);
      changed(b);
      const next = nextSuggestion(b);
      if (next) select(next, true);
      say("Accepted " + classOf(b).name + "." + (next ? " Next: " + describe(next) : " No suggestions left."));
    }

    function rejectSelected() {
      if (!selected || selected.source !== "model") return say("The selected box is not a suggestion.");
      const b = selected;
      const next = nextSuggestion(b);
      remember();
      removeBox(b);
      changed(null);
      select(next, true);
      say("Rejected " + classOf(b).name + "." + (next ? " Next: " + describe(next) : " No suggestions left."));
    }

    function acceptAll() {
      const todo = boxes.filter(function (b) { return b.source === "model"; });
      if (!todo.length) return say("No suggestions to accept.");
      remember();
      todo.forEach(function (b) {
        accept(b);
        updateEl(b);
      });
      changed(null);
      say("Accepted " + todo.length + " suggestions.");
    }

    // ------------------------------------------------------------------------------------------ server
    function showAlert(text, offerReload) {
      alertText.textContent = text;
      reloadBtn.hidden = !offerReload;
      alertEl.hidden = false;
    }

    function hideAlert() {
      alertEl.hidden = true;
    }

    async function request(method, url, body) {
      const response = await fetch(url, {
        method: method,
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": csrf },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      let data = null;
      try {
        data = await response.json();
      } catch (err) {
        data = null;
      }
      return { status: response.status, data: data };
    }

    function errorText(r) {
      const e = r.data && r.data.error;
      return e && e.message ? e.message : "The server answered " + r.status + ".";
    }

    function loaded(data, text) {
      version = data.version;
      dirty = false;
      history = [];
      truncated = false;
      lastOp = null;
      setBoxes(data.boxes, false);
      hideAlert();
      root.dataset.ready = "1";
      say(text || boxes.length + " boxes (version " + version + ").");
    }

    async function load(text) {
      try {
        const r = await request("GET", api);
        if (r.status !== 200) return showAlert("Could not load the boxes: " + errorText(r), false);
        loaded(r.data, text);
      } catch (err) {
        showAlert("Network error while loading the boxes: " + err + ".", false);
      }
    }

    async function save() {
      if (busy) return;
      busy = true;
      root.dataset.saving = "1";
      say("Saving…");
      const sent = boxes.map(plain);
      const body = {
        version: version,
        boxes: sent.map(function (b) {
          return { x: b.x, y: b.y, w: b.w, h: b.h, class_id: b.class_id, source: b.source, score: b.score };
        }),
      };
      try {
        const r = await request("PUT", api, body);
        if (r.status === 200) {
          version = r.data.version;
          // The server keeps the order it was sent (and may clip a float overshoot): take its values, keep the ids.
          const same = r.data.boxes.length === sent.length;
          setBoxes(r.data.boxes.map(function (d, i) { return same ? Object.assign({}, d, { id: sent[i].id }) : d; }), same);
          dirty = false;
          history = [];
          truncated = false;
          lastOp = null;
          hideAlert();
          updateCount();
          say("Saved " + boxes.length + " boxes (version " + version + ").");
        } else if (r.status === 409) {
          const cur = (r.data.error.details || {}).current || {};
          showAlert(
            "Not saved: someone else changed these boxes meanwhile (now version " + cur.version + ", " +
              (cur.boxes || []).length + " boxes" + (cur.updated_by ? ", by " + cur.updated_by : "") +
              "). Nothing was overwritten and your edits are still here.",
            true
          );
          say("Not saved (conflict).");
        } else {
          const text = errorText(r);
          showAlert("Not saved: " + text, false);
          say("Not saved.");
          const m = /box (\d+):/.exec(text);
          if (m && boxes[Number(m[1])]) select(boxes[Number(m[1])], true);
        }
      } catch (err) {
        showAlert("Network error: " + err + ". Nothing was saved; try again.", false);
      } finally {
        busy = false;
        root.dataset.saving = "";
      }
    }

    async function undo() {
      if (history.length) {
        setBoxes(history.pop(), true);
        lastOp = null;
        dirty = history.length > 0 || truncated;
        updateCount();
        return say("Undone. " + (selected ? describe(selected) : boxes.length + " boxes."));
      }
      if (busy) return;
      busy = true;
      try {
        const now = await request("GET", api);
        if (now.status === 200 && now.data.version !== version) {
          return showAlert("Someone else changed these boxes since you loaded them (now version " + now.data.version +
            "); load them before undoing.", true);
        }
        const r = await request("POST", root.dataset.undo);
        if (r.status === 200) loaded(r.data, "Undid the last saved change: " + r.data.boxes.length + " boxes (version " + r.data.version + ").");
        else say("Nothing undone: " + errorText(r));
      } catch (err) {
        showAlert("Network error: " + err + ". Nothing was undone.", false);
      } finally {
        busy = false;
      }
    }

    // ------------------------------------------------------------------------------------------ keys
    function onKey(e) {
      const t0 = performance.now();
      const handled = key(e);
      if (handled) {
        e.preventDefault();
        e.stopPropagation();
        stats.keys.push(performance.now() - t0);
        requestAnimationFrame(function () { stats.frames.push(performance.now() - t0); });
      }
    }

    function key(e) {
      const k = e.key;
      const mod = e.ctrlKey || e.metaKey;
      if (mod && (k === "s" || k === "S")) return save(), true;
      if (mod && (k === "z" || k === "Z") && !e.shiftKey) return undo(), true;
      if (e.target !== viewport) return false;
      if (k === "Tab") {
        const order = readingOrder();
        if (!order.length) return false;
        if (e.shiftKey) {
          if (!selected) return false;
          const prev = step(-1, false);
          select(prev);
          return true;
        }
        const next = step(1, false);
        if (!next) {
          select(null, true);
          return false; // after the last box Tab leaves the editor
        }
        select(next);
        return true;
      }
      if (k.startsWith("Arrow")) {
        const n = e.shiftKey ? 10 : 1;
        const dx = k === "ArrowLeft" ? -n : k === "ArrowRight" ? n : 0;
        const dy = k === "ArrowUp" ? -n : k === "ArrowDown" ? n : 0;
        if (!selected) {
          tx -= dx * 5;
          ty -= dy * 5;
          applyView();
          return true;
        }
        if (e.altKey || mod) resize(dx, dy);
        else move(dx, dy);
        return true;
      }
      if (mod || e.altKey) return false;
      if (k === "n" || k === "p") {
        const b = step(k === "n" ? 1 : -1, true);
        if (b) select(b);
        else say("No boxes yet: b makes one.");
        return true;
      }
      if (k === "Delete" || k === "Backspace") return deleteSelected(), true;
      if (/^[1-9]$/.test(k)) {
        const c = classes[Number(k) - 1];
        if (c) setClass(c.id);
        return true;
      }
      if (k === "A") return acceptAll(), true;
      if (k === "a") return acceptSelected(), true;
      if (k === "r") return rejectSelected(), true;
      if (k === "b") return addAtCentre(), true;
      if (k === "+" || k === "=") return zoomKey(1.25), true;
      if (k === "-" || k === "_") return zoomKey(0.8), true;
      if (k === "0") return fit(), say("Zoom to fit."), true;
      if (k === "s") return save(), true;
      if (k === "Escape") {
        if (!alertEl.hidden) hideAlert();
        return select(null), true;
      }
      if (k === "?") return (help.open = !help.open), true;
      if (k === " ") {
        spaceDown = true;
        viewport.classList.add("space");
        return true;
      }
      return false;
    }

    // ------------------------------------------------------------------------------------------ mouse
    function onPointerDown(e) {
      viewport.focus({ preventScroll: true });
      if (e.button === 1 || (e.button === 0 && spaceDown)) {
        drag = { mode: "pan", sx: e.clientX, sy: e.clientY, tx: tx, ty: ty };
        viewport.classList.add("panning");
      } else if (e.button === 0) {
        const p = toImage(e.clientX, e.clientY);
        const handle = e.target.dataset && e.target.dataset.h;
        const g = e.target.closest && e.target.closest(".be-box");
        if (handle && selected) {
          drag = { mode: "resize", h: handle, b: selected, o: plain(selected), p: p, moved: false };
        } else if (g) {
          const b = byId.get(Number(g.dataset.id));
          select(b, false, true);
          drag = { mode: "move", b: b, o: plain(b), p: p, moved: false };
        } else {
          drag = { mode: "draw", p: { x: clamp(p.x, 0, W), y: clamp(p.y, 0, H) }, sx: e.clientX, sy: e.clientY };
        }
      } else {
        return;
      }
      e.preventDefault();
      viewport.setPointerCapture(e.pointerId);
    }

    function onPointerMove(e) {
      if (!drag) return;
      lastPointer = { x: e.clientX, y: e.clientY };
      if (!frameQueued) {
        frameQueued = true;
        requestAnimationFrame(frame);
      }
    }

    function frame() {
      frameQueued = false;
      if (!drag || !lastPointer) return;
      const t0 = performance.now();
      applyDrag();
      stats.drag.push(performance.now() - t0);
    }

    function applyDrag() {
      const cx = lastPointer.x, cy = lastPointer.y;
      if (drag.mode === "pan") {
        tx = drag.tx + cx - drag.sx;
        ty = drag.ty + cy - drag.sy;
        applyView();
        return;
      }
      const p = toImage(cx, cy);
      if (drag.mode === "draw") {
        const r = drawRect(drag.p, p);
        draft.setAttribute("x", r.x);
        draft.setAttribute("y", r.y);
        draft.setAttribute("width", r.w);
        draft.setAttribute("height", r.h);
        draft.setAttribute("visibility", "visible");
        return;
      }
      const dx = Math.round(p.x - drag.p.x), dy = Math.round(p.y - drag.p.y);
      const b = drag.b, o = drag.o;
      if (!drag.moved && !dx && !dy) return;
      if (!drag.moved) {
        drag.moved = true;
        remember();
        lastOp = null;
      }
      if (drag.mode === "move") {
        b.x = clamp(o.x + dx, 0, W - o.w);
        b.y = clamp(o.y + dy, 0, H - o.h);
      } else {
        let x0 = o.x, y0 = o.y, x1 = o.x + o.w, y1 = o.y + o.h;
        if (drag.h.includes("w")) x0 = clamp(o.x + dx, 0, x1 - 1);
        if (drag.h.includes("e")) x1 = clamp(x1 + dx, x0 + 1, W);
        if (drag.h.includes("n")) y0 = clamp(o.y + dy, 0, y1 - 1);
        if (drag.h.includes("s")) y1 = clamp(y1 + dy, y0 + 1, H);
        b.x = x0;
        b.y = y0;
        b.w = x1 - x0;
        b.h = y1 - y0;
      }
      if (b.source === "model") accept(b);
      changed(b);
    }

    function drawRect(a, p) {
      const x0 = Math.round(clamp(Math.min(a.x, p.x), 0, W)), x1 = Math.round(clamp(Math.max(a.x, p.x), 0, W));
      const y0 = Math.round(clamp(Math.min(a.y, p.y), 0, H)), y1 = Math.round(clamp(Math.max(a.y, p.y), 0, H));
      return { x: x0, y: y0, w: x1 - x0, h: y1 - y0 };
    }

    function onPointerUp(e) {
      if (!drag) return;
      if (lastPointer) frame();
      const d = drag;
      drag = null;
      lastPointer = null;
      viewport.classList.remove("panning");
      draft.setAttribute("visibility", "hidden");
      if (d.mode === "draw") {
        const r = drawRect(d.p, toImage(e.clientX, e.clientY));
        const far = Math.abs(e.clientX - d.sx) + Math.abs(e.clientY - d.sy) >= 4;
        if (far && r.w >= 1 && r.h >= 1) {
          if (!classes.length) return say("This head has no classes yet; add one first.");
          add(r.x, r.y, r.w, r.h);
        } else {
          select(null);
        }
      } else if ((d.mode === "move" || d.mode === "resize") && d.moved) {
        say(describe(d.b));
      }
    }

    function onWheel(e) {
      e.preventDefault();
      const r = viewport.getBoundingClientRect();
      zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
    }

    // ------------------------------------------------------------------------------------------ wiring
    viewport.addEventListener("keydown", onKey);
    root.addEventListener("keydown", function (e) {
      if (e.target !== viewport) onKey(e); // Ctrl+S / Ctrl+Z from the toolbar
    });
    viewport.addEventListener("keyup", function (e) {
      if (e.key === " ") {
        spaceDown = false;
        viewport.classList.remove("space");
      }
    });
    viewport.addEventListener("pointerdown", onPointerDown);
    viewport.addEventListener("pointermove", onPointerMove);
    viewport.addEventListener("pointerup", onPointerUp);
    viewport.addEventListener("pointercancel", onPointerUp);
    viewport.addEventListener("wheel", onWheel, { passive: false });
    viewport.addEventListener("auxclick", function (e) { e.preventDefault(); });
    picker.addEventListener("change", function () {
      setClass(Number(picker.value));
      viewport.focus({ preventScroll: true });
    });
    root.querySelector(".be-toolbar").addEventListener("click", function (e) {
      const b = e.target.closest("[data-do]");
      if (b) act(b.dataset.do);
    });
    alertEl.addEventListener("click", function (e) {
      const b = e.target.closest("[data-do]");
      if (b) act(b.dataset.do);
    });

    function act(what) {
      if (what === "save") save();
      else if (what === "undo") undo();
      else if (what === "draw") addAtCentre();
      else if (what === "delete") deleteSelected();
      else if (what === "accept-all") acceptAll();
      else if (what === "zoom-in") zoomKey(1.25);
      else if (what === "zoom-out") zoomKey(0.8);
      else if (what === "zoom-reset") fit();
      else if (what === "reload") load("Loaded the current boxes.");
      else if (what === "dismiss") hideAlert();
      viewport.focus({ preventScroll: true });
    }

    window.addEventListener("beforeunload", function (e) {
      if (!dirty) return;
      e.preventDefault();
      e.returnValue = "";
    });
    window.addEventListener("resize", function () {
      if (Math.abs(scale - fitScale()) < 1e-6 || scale < fitScale()) fit();
    });

    fit();
    load();

    return {
      root: root,
      focus: function () { viewport.focus({ preventScroll: true }); },
      state: function () {
        return {
          version: version,
          dirty: dirty,
          scale: scale,
          tx: tx,
          ty: ty,
          selected: selected ? plain(selected) : null,
          boxes: boxes.map(plain),
          order: readingOrder().map(function (b) { return b.id; }),
        };
      },
      stats: stats,
    };
  }

  const editors = Array.from(document.querySelectorAll(".box-editor")).map(BoxEditor);
  window.loupeBoxEditors = editors;
  if (editors.length && !document.querySelector("[autofocus]")) editors[0].focus();
})();
