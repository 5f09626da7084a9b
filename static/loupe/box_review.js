// The shelf box queue (templates/review/boxes.html): the decision form sends the box set version the editor holds
// now (the reviewer may have saved since the page loaded), and refuses to finish while edits are unsaved.
// Keys (the photo's editor focused or nothing; not in a field or on a button): d = done, Shift+Enter = accept all and finish,
// x = exclude, Shift+S = skip, u = undo.
(function () {
  "use strict";
  const form = document.getElementById("review-form");
  const editor = document.querySelector(".box-editor");
  const status = document.getElementById("review-status");
  if (!form) return;
  let clicked = null;
  form.addEventListener("click", function (e) {
    const b = e.target.closest("button[name=action]");
    if (b) clicked = b.value;
  });
  form.addEventListener("submit", function (e) {
    const action = (e.submitter && e.submitter.value) || clicked;
    if (editor) {
      form.elements.version.value = editor.dataset.version || form.elements.version.value;
      if ((action === "accept" || action === "done") && editor.dataset.dirty) {
        e.preventDefault();
        status.textContent = "Save your box edits first (s in the editor), then finish.";
      }
    }
  });
  function press(id) {
    const b = document.getElementById(id);
    if (b) b.click();
  }
  document.addEventListener("keydown", function (e) {
    const t = e.target;
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey) return;
    // the editor's own keys stop there; the ones it leaves (d, x, u, Shift+S, Shift+Enter) reach this page
    if (t.closest && t.closest("input, select, textarea, button, a, dialog")) return;
    if (e.key === "d") press("btn-done");
    else if (e.key === "Enter" && e.shiftKey) press("btn-accept");
    else if (e.key === "x") press("btn-exclude");
    else if (e.key === "S") press("btn-skip");
    else if (e.key === "u") document.querySelector("#undo-form button").click();
    else return;
    e.preventDefault();
  });
})();
