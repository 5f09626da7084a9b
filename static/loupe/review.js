// Review queue, keyboard first. Every decision is a POST that answers the next item's panel (HTML), swapped in
// place; without JavaScript the same forms post and redirect.
(function () {
  "use strict";
  const root = document.getElementById("review");
  if (!root) return;
  let busy = false;

  function csrf() {
    const input = document.querySelector("#review-panel input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  async function post(url, body) {
    if (busy) return;
    busy = true;
    const status = document.getElementById("review-status");
    if (status) status.textContent = "Saving…";
    try {
      const response = await fetch(url, {
        method: "POST",
        body: body,
        headers: { "X-CSRFToken": csrf(), "HX-Request": "true" },
        credentials: "same-origin",
      });
      const html = await response.text();
      const panel = document.getElementById("review-panel");
      const holder = document.createElement("div");
      holder.innerHTML = html;
      const fresh = holder.querySelector("#review-panel");
      if (panel && fresh) {
        panel.replaceWith(fresh);
        if (window.htmx) window.htmx.process(fresh);
        if (window.loupePicker) window.loupePicker.scan(fresh);
      } else if (status) {
        status.textContent = "The server answered " + response.status + "; nothing changed. Reload the page.";
      }
    } catch (err) {
      if (status) status.textContent = "Network error: " + err + ". Nothing was saved; try again.";
    } finally {
      busy = false;
    }
  }

  function decide(action, classId) {
    const form = document.getElementById("review-form");
    if (!form) return;
    const body = new FormData(form);
    body.set("action", action);
    body.set("class_id", classId || "");
    post(form.getAttribute("action"), body); // not form.action: the buttons are named "action"
  }

  function undo() {
    const form = document.getElementById("undo-form");
    if (form) post(form.getAttribute("action"), new FormData(form));
  }

  root.addEventListener("submit", function (event) {
    const form = event.target;
    event.preventDefault();
    if (form.id === "undo-form") return undo();
    const button = event.submitter;
    decide(button ? button.value : "accept", button && button.dataset.class ? button.dataset.class : "");
  });

  // "/" opens the type-ahead class picker (static/loupe/picker.js); its choice relabels to that class
  root.addEventListener("picker:choose", function (event) {
    decide("relabel", event.detail.id);
  });

  root.addEventListener("click", function (event) {
    if (event.target.closest("#btn-help")) document.getElementById("shortcuts").showModal();
  });

  // Closing the help gives the focus back to its button: take it off, so the page keys work again.
  document.getElementById("shortcuts")?.addEventListener("close", function () {
    if (document.activeElement && document.activeElement.id === "btn-help") document.activeElement.blur();
  });

  // Page keys act only when the focus is on the page itself: on a link, a button or a field, Enter and the
  // letters do what they do there (follow the link, press that button, type), never decide for the reviewer.
  const OWN_KEYS = "a[href], button, input, textarea, select, summary, [contenteditable], [role=button], [role=link]";

  document.addEventListener("keydown", function (event) {
    const dialog = document.getElementById("shortcuts");
    if (dialog && dialog.open) return; // Esc closes it natively
    const target = event.target;
    if (target && target.closest && target.closest(OWN_KEYS)) {
      // Esc on a link or button hands the keys back to the page (fields handle their own Esc)
      if (event.key === "Escape" && !target.closest("input, textarea, select, [contenteditable]")) target.blur();
      return;
    }
    if (event.altKey || event.metaKey) return;
    if (event.ctrlKey) {
      if (event.key === "z") {
        event.preventDefault();
        undo();
      }
      return;
    }
    const key = event.key;
    let handled = true;
    if (key === "Enter" || key === "a") decide("accept");
    else if (key === "k") decide("keep");
    else if (key === "x") decide("exclude");
    else if (key === "s" || key === "ArrowRight") decide("skip");
    else if (key === "u" || key === "ArrowLeft") undo();
    else if (key === "?") dialog.showModal();
    else if (key === "/") document.getElementById("class-picker-input")?.focus();
    else if (/^[1-9]$/.test(key)) {
      const pick = document.querySelector('#review-panel .pick[data-key="' + key + '"]');
      if (pick) decide("relabel", pick.dataset.class);
    } else handled = false;
    if (handled) event.preventDefault();
  });
})();
