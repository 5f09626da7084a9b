// The Import page's drop zone (templates/labeling/_upload.html, labeling/upload_views.py). Photos or whole
// folders (dropped — DataTransferItem.webkitGetAsEntry walks a dropped folder — or chosen with the file inputs,
// `webkitdirectory` for a folder) keep their relative paths (Toyota/car_1.jpg: "class from folder" reads the
// parent folder). A pre-check here (name, size) tells at once what cannot go; the server checks again and is the
// authority. The photos go in sequential requests of a few files / MB (XHR, for the progress bar), each with the
// CSRF token; a failed request is retried, then the Retry button resumes from it. Then "start" queues the import
// job, whose progress is polled until it ends: the report, and a link to the images.
(function () {
  "use strict";
  const root = document.getElementById("upload");
  if (!root) return;
  const limits = JSON.parse(document.getElementById("upload-limits").textContent);
  const $ = (id) => document.getElementById(id);
  const csrf = root.querySelector("[name=csrfmiddlewaretoken]").value;
  const RETRIES = 3;

  let picked = []; // [{file, path}]
  let refused = []; // [{path, reason}]
  let upload = null; // {id, urls} once created
  let batches = [];
  let next = 0; // the batch to send next
  let sentBytes = 0;
  let totalBytes = 0;
  let staged = 0;
  let xhr = null;
  let stopped = false;
  let poller = null;

  function mib(n) {
    return n < 1048576 ? Math.ceil(n / 1024) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
  }

  function setStatus(text) {
    $("upload-status").textContent = text;
  }

  function showRefused() {
    const list = $("upload-refused");
    list.textContent = "";
    for (const r of refused.slice(0, 500)) {
      const li = document.createElement("li");
      li.textContent = r.path + " — " + r.reason;
      list.appendChild(li);
    }
    if (refused.length > 500) {
      const li = document.createElement("li");
      li.textContent = "… and " + (refused.length - 500) + " more";
      list.appendChild(li);
    }
    $("upload-refused-title").textContent = refused.length + " file(s) refused (not uploaded):";
    $("upload-refused-box").hidden = !refused.length;
  }

  function showSelection() {
    const bytes = picked.reduce((s, p) => s + p.file.size, 0);
    $("upload-summary").textContent = picked.length
      ? picked.length + " photo(s), " + mib(bytes) + " selected. Add more, or upload them."
      : "No photo to upload.";
    $("upload-selection").hidden = false;
    $("upload-go").disabled = !picked.length;
    showRefused();
  }

  // The browser's pre-check: what the server would refuse anyway (it checks again, and the content too).
  function precheck(file, path) {
    const dot = path.lastIndexOf(".");
    const ext = dot >= 0 ? path.slice(dot).toLowerCase() : "";
    if (!limits.extensions.includes(ext)) return "not an image file name (" + limits.extensions.join(" ") + ")";
    if (!file.size) return "empty file";
    if (file.size > limits.file_bytes) return mib(file.size) + ", more than the " + mib(limits.file_bytes) + " limit per photo";
    return null;
  }

  function add(items) {
    if (!items.length) {
      $("upload-selection").hidden = false;
      $("upload-summary").textContent = "Nothing to upload: the drop held no files.";
      return;
    }
    const seen = new Set(picked.map((p) => p.path));
    for (const { file, path } of items) {
      const why = precheck(file, path);
      if (why) refused.push({ path, reason: why });
      else if (!seen.has(path)) {
        seen.add(path);
        picked.push({ file, path });
      }
    }
    showSelection();
  }

  // ---- collecting files: drops (folders walked) and the two inputs
  function entryFile(entry) {
    return new Promise((resolve, reject) => entry.file(resolve, reject));
  }

  async function walk(dir, prefix, out) {
    const reader = dir.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) return; // readEntries gives up to 100 at a time: read until it gives none
      for (const entry of batch) {
        const path = prefix + "/" + entry.name;
        if (entry.isDirectory) await walk(entry, path, out);
        else if (entry.isFile) out.push({ file: await entryFile(entry), path });
      }
    }
  }

  async function fromDrop(dt) {
    const items = Array.from(dt.items || []).filter((i) => i.kind === "file");
    // Entries and files must be taken while the drop event runs: the list is emptied afterwards.
    const entries = items.map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
    const files = items.map((i) => i.getAsFile());
    const out = [];
    for (let k = 0; k < items.length; k++) {
      if (entries[k] && entries[k].isDirectory) await walk(entries[k], entries[k].name, out);
      else if (files[k]) out.push({ file: files[k], path: files[k].webkitRelativePath || files[k].name });
    }
    if (!items.length && dt.files) for (const f of dt.files) out.push({ file: f, path: f.name });
    return out;
  }

  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (upload) return; // one upload at a time on this page
    fromDrop(e.dataTransfer).then(add, (err) => {
      $("upload-selection").hidden = false;
      $("upload-summary").textContent = "Cannot read what was dropped: " + err;
    });
  });
  zone.addEventListener("click", () => $("pick-files").click());
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("pick-files").click();
    }
  });
  for (const id of ["pick-files", "pick-folder"]) {
    $(id).addEventListener("change", (e) => {
      add(Array.from(e.target.files).map((f) => ({ file: f, path: f.webkitRelativePath || f.name })));
      e.target.value = "";
    });
  }
  $("upload-clear").addEventListener("click", () => {
    picked = [];
    refused = [];
    $("upload-selection").hidden = true;
    showRefused();
  });

  // ---- sending
  function post(url, data) {
    return fetch(url, {
      method: "POST",
      body: data || new FormData(),
      headers: { "X-CSRFToken": csrf },
      credentials: "same-origin",
    }).then(async (r) => ({ status: r.status, body: await r.json().catch(() => null) }));
  }

  function message(res, what) {
    if (res.body && res.body.error) return res.body.error.message;
    if (res.status === 403) return "Only admins of this project can import photos (or your session ended).";
    if (res.status === 413) return "The request was too large for the server.";
    return what + " failed (HTTP " + res.status + ").";
  }

  function makeBatches(items) {
    const out = [];
    let cur = [];
    let bytes = 0;
    for (const item of items) {
      if (cur.length && (cur.length >= limits.batch_files || bytes + item.file.size > limits.batch_bytes)) {
        out.push(cur);
        cur = [];
        bytes = 0;
      }
      cur.push(item);
      bytes += item.file.size;
    }
    if (cur.length) out.push(cur);
    return out;
  }

  function sendBatch(batch) {
    return new Promise((resolve) => {
      const data = new FormData();
      for (const { file, path } of batch) {
        data.append("files", file, file.name);
        data.append("paths", path);
      }
      xhr = new XMLHttpRequest();
      xhr.open("POST", upload.urls.files);
      xhr.setRequestHeader("X-CSRFToken", csrf);
      xhr.responseType = "json";
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable && totalBytes) $("upload-progress").value = Math.min(1, (sentBytes + e.loaded) / totalBytes);
      };
      xhr.onload = () => resolve({ status: xhr.status, body: xhr.response });
      xhr.onerror = () => resolve({ status: 0, body: null });
      xhr.onabort = () => resolve({ status: -1, body: null });
      xhr.send(data);
    });
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function sendAll() {
    $("upload-retry").hidden = true;
    while (next < batches.length) {
      if (stopped) return;
      const batch = batches[next];
      const bytes = batch.reduce((s, p) => s + p.file.size, 0);
      let res = null;
      for (let attempt = 1; attempt <= RETRIES; attempt++) {
        setStatus(
          "Uploading request " + (next + 1) + " of " + batches.length + (attempt > 1 ? " (try " + attempt + ")" : "") + "…"
        );
        res = await sendBatch(batch);
        if (stopped || res.status === -1) return;
        // 4xx: the server said no (limits, rights, a cancelled upload); retrying would say the same
        if (res.status === 200 || (res.status >= 400 && res.status < 500)) break;
        await sleep(1000 * attempt);
      }
      if (res.status !== 200) {
        setStatus(
          "Request " + (next + 1) + " of " + batches.length + " failed: " + message(res, "The upload") +
            (res.status >= 400 && res.status < 500 ? "" : " Press Retry to go on from it.")
        );
        $("upload-retry").hidden = res.status >= 400 && res.status < 500;
        return;
      }
      for (const r of res.body.refused) refused.push(r);
      staged = res.body.files;
      showRefused();
      sentBytes += bytes;
      $("upload-progress").value = totalBytes ? sentBytes / totalBytes : 1;
      next++;
    }
    await start(upload.urls.start);
  }

  function options() {
    const data = new FormData();
    for (const el of root.querySelectorAll("#upload-options [name]")) {
      if ((el.type === "radio" || el.type === "checkbox") && !el.checked) continue;
      data.append(el.name, el.value);
    }
    return data;
  }

  async function start(url) {
    if (!staged && upload) {
      setStatus("Nothing was uploaded: every file was refused.");
      await post(upload.urls.cancel);
      upload = null;
      return;
    }
    setStatus("Uploaded " + staged + " photo(s). Starting the import…");
    const res = await post(url, options());
    if (res.status !== 202) {
      setStatus(message(res, "Starting the import"));
      return;
    }
    $("upload-progress-box").hidden = true;
    follow(res.body);
  }

  function follow(info) {
    $("upload-job").hidden = false;
    const show = (info) => {
      const job = info.job;
      const bar = $("upload-job-progress");
      let text = "Import " + job.id + ": " + job.status;
      if (job.status === "queued") text += job.ahead ? " (" + job.ahead + " job(s) ahead)" : ", next for a worker";
      if (job.status === "running") text += (job.step ? ", " + job.step : "") + " — " + info.done + " of " + info.total + " photo(s)";
      if (job.cancel_requested && job.status === "running") text += " — stopping (cancel asked)";
      if (job.error && job.status !== "succeeded") text += ". " + job.error;
      $("upload-job-status").textContent = text;
      bar.hidden = job.progress === null;
      if (job.progress !== null) bar.value = job.progress;
      const ended = !["queued", "running"].includes(job.status);
      if (ended) {
        clearInterval(poller);
        root.dataset.importStatus = job.status;
        $("upload-report").hidden = !info.report.length;
        $("upload-report").textContent = info.report.join("\n");
        $("upload-done").hidden = job.status !== "succeeded";
        $("upload-grid-link").href = info.grid_url;
        upload = null;
      }
      return ended;
    };
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "link";
    cancel.id = "upload-job-cancel";
    cancel.textContent = "Cancel the import";
    cancel.onclick = async () => {
      const res = await post(info.cancel_url);
      if (res.body && res.body.job) show(res.body);
    };
    $("upload-job-status").after(cancel);
    if (show(info)) return cancel.remove();
    poller = setInterval(async () => {
      const r = await fetch(info.status_url, { credentials: "same-origin" });
      if (!r.ok) return;
      if (show(await r.json())) cancel.remove();
    }, 1000);
  }

  $("upload-go").addEventListener("click", async () => {
    if (!picked.length || upload) return;
    stopped = false;
    $("upload-go").disabled = true;
    $("upload-progress-box").hidden = false;
    setStatus("Starting the upload…");
    const res = await post(root.dataset.createUrl);
    if (res.status !== 201) {
      setStatus(message(res, "Starting the upload"));
      $("upload-go").disabled = false;
      return;
    }
    upload = res.body;
    batches = makeBatches(picked);
    picked = [];
    next = 0;
    sentBytes = 0;
    staged = 0;
    totalBytes = batches.flat().reduce((s, p) => s + p.file.size, 0);
    $("upload-selection").hidden = true;
    await sendAll();
  });
  $("upload-retry").addEventListener("click", () => sendAll());
  $("upload-cancel").addEventListener("click", async () => {
    stopped = true;
    if (xhr) xhr.abort();
    if (upload) {
      const res = await post(upload.urls.cancel);
      setStatus(res.status === 200 ? "Cancelled: the photos sent so far were removed." : message(res, "Cancelling"));
    }
    upload = null;
    $("upload-retry").hidden = true;
  });

  // Uploads left from an earlier visit (the browser was closed mid-way): import what arrived, or cancel them.
  for (const btn of root.querySelectorAll("[data-cancel-upload]")) {
    btn.addEventListener("click", async () => {
      const res = await post(btn.dataset.cancelUpload);
      if (res.status === 200) btn.closest("tr").remove();
      else alert(message(res, "Cancelling"));
    });
  }
  for (const btn of root.querySelectorAll("[data-start-upload]")) {
    btn.addEventListener("click", async () => {
      const res = await post(btn.dataset.startUpload, options());
      if (res.status !== 202) return alert(message(res, "Starting the import"));
      btn.closest("tr").remove();
      follow(res.body);
    });
  }
})();
