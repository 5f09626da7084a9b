// Type-ahead class picker over a label editor's <select data-picker>: instant with thousands of classes (one
// array filtered per key press, at most 50 rows drawn), keyboard driven (type, ↑/↓, Enter, Esc), hierarchy-aware
// (a child head — model — lists only the children of its parent head's current class — make —, and picking a
// child whose parent differs sets the parent first), and admins may create a class that does not exist yet.
// On the review page (<select data-picker data-event>) a choice is not submitted: the picker fires a bubbling
// "picker:choose" event ({detail: {id, name}}) and review.js decides; options may carry data-parent-name (shown
// beside the name and searched too: typing a make lists its models).
(function () {
  "use strict";
  const MAX_ROWS = 50;

  function norm(s) {
    return s.toLowerCase().normalize("NFKD").replace(/[\u0300-\u036f]/g, "");
  }

  function editorOf(headId) {
    return document.querySelector('select[data-picker][data-head-id="' + headId + '"]');
  }

  function setup(select) {
    if (select.dataset.pickerReady) return;
    select.dataset.pickerReady = "1";
    const form = select.form;
    const options = Array.from(select.options)
      .filter((o) => o.value)
      .map((o) => ({
        id: o.value,
        name: o.textContent,
        key: norm(o.textContent + (o.dataset.parentName ? " " + o.dataset.parentName : "")),
        parent: o.dataset.parent || "",
        parentName: o.dataset.parentName || "",
      }));
    const wrap = document.createElement("div");
    wrap.className = "picker";
    const input = document.createElement("input");
    input.type = "text";
    input.autocomplete = "off";
    input.className = "picker-input";
    input.setAttribute("aria-label", select.dataset.head + " class");
    input.placeholder =
      select.dataset.placeholder ||
      (select.selectedOptions[0] && select.value ? select.selectedOptions[0].textContent : "unlabeled") + " — type to change";
    if (select.id) input.id = select.id + "-input";
    const list = document.createElement("ul");
    list.className = "picker-list";
    list.setAttribute("role", "listbox");
    list.hidden = true;
    wrap.append(input, list);
    select.after(wrap);
    select.hidden = true;
    let rows = [];
    let active = 0;

    function parentFilter() {
      const parentHead = select.dataset.parentHeadId;
      if (!parentHead) return "";
      const parentSelect = editorOf(parentHead);
      return parentSelect ? parentSelect.value : "";
    }

    function matches(pool, q, limit) {
      if (!q) return pool.slice(0, limit);
      const starts = [];
      const contains = [];
      for (const o of pool) {
        const at = o.key.indexOf(q);
        if (at === 0) starts.push(o);
        else if (at > 0) contains.push(o);
        if (starts.length >= limit) break;
      }
      return starts.concat(contains).slice(0, limit);
    }

    function parentName(id) {
      const parentSelect = editorOf(select.dataset.parentHeadId);
      const opt = parentSelect && Array.from(parentSelect.options).find((o) => o.value === id);
      return opt ? opt.textContent : "";
    }

    function render() {
      const q = norm(input.value.trim());
      const parent = parentFilter();
      // the chosen make's models first; typing also finds other makes' models (picking one sets its make)
      let hits = matches(parent ? options.filter((o) => o.parent === parent) : options, q, MAX_ROWS);
      if (parent && q && hits.length < MAX_ROWS) {
        hits = hits.concat(matches(options.filter((o) => o.parent !== parent), q, MAX_ROWS - hits.length));
      }
      rows = hits.map((o) => ({ kind: "pick", option: o }));
      const exact = q && options.some((o) => o.key === q);
      if (q && !exact && select.dataset.canCreate === "1") rows.push({ kind: "create", name: input.value.trim() });
      list.innerHTML = "";
      rows.forEach((row, i) => {
        const li = document.createElement("li");
        li.setAttribute("role", "option");
        const other = row.kind === "pick" && parent && row.option.parent && row.option.parent !== parent;
        li.textContent =
          row.kind === "create"
            ? "+ create “" + row.name + "”"
            : row.option.name +
              (other ? " (" + parentName(row.option.parent) + ")" : row.option.parentName ? " (" + row.option.parentName + ")" : "");
        if (row.kind === "create") li.className = "create";
        li.addEventListener("mousedown", (e) => {
          e.preventDefault();
          choose(i);
        });
        list.append(li);
      });
      if (!rows.length) {
        const li = document.createElement("li");
        li.className = "muted";
        li.textContent = parent ? "no class under the chosen " + (editorOf(select.dataset.parentHeadId).dataset.head) : "no match";
        list.append(li);
      }
      active = Math.min(active, Math.max(0, rows.length - 1));
      highlight();
      list.hidden = false;
    }

    function highlight() {
      Array.from(list.children).forEach((li, i) => li.classList.toggle("active", i === active));
    }

    async function submitWith(value) {
      select.value = value;
      if (form.requestSubmit) form.requestSubmit();
      else form.submit();
    }

    async function choose(i) {
      const row = rows[i];
      if (!row) return;
      list.hidden = true;
      if (row.kind === "create") {
        const body = new FormData();
        body.set("name", row.name);
        const parent = parentFilter();
        if (parent) body.set("parent", parent);
        const token = form.querySelector("input[name=csrfmiddlewaretoken]").value;
        const response = await fetch(select.dataset.createUrl, {
          method: "POST",
          body: body,
          headers: { "X-CSRFToken": token },
          credentials: "same-origin",
        });
        const data = await response.json();
        if (!response.ok) {
          input.value = "";
          input.placeholder = data.error || "could not create the class";
          return;
        }
        const opt = new Option(data.name, String(data.id));
        opt.dataset.parent = data.parent ? String(data.parent) : "";
        select.add(opt);
        return submitWith(String(data.id));
      }
      const option = row.option;
      if (select.dataset.event !== undefined) {
        input.value = "";
        select.dispatchEvent(new CustomEvent("picker:choose", { bubbles: true, detail: { id: option.id, name: option.name } }));
        return;
      }
      const parentHead = select.dataset.parentHeadId;
      if (parentHead && option.parent) {
        const parentSelect = editorOf(parentHead);
        if (parentSelect && parentSelect.value !== option.parent) {
          parentSelect.value = option.parent; // a model is never saved under another make
          const parentForm = parentSelect.form;
          await new Promise((resolve) => {
            const done = () => {
              document.body.removeEventListener("htmx:afterSwap", done);
              resolve();
            };
            document.body.addEventListener("htmx:afterSwap", done);
            if (parentForm.requestSubmit) parentForm.requestSubmit();
            else parentForm.submit();
            setTimeout(done, 3000);
          });
        }
      }
      const fresh = editorOf(select.dataset.headId) || select;
      fresh.value = option.id;
      if (fresh.form.requestSubmit) fresh.form.requestSubmit();
      else fresh.form.submit();
    }

    input.addEventListener("focus", render);
    input.addEventListener("input", () => {
      active = 0;
      render();
    });
    input.addEventListener("blur", () => setTimeout(() => (list.hidden = true), 150));
    input.addEventListener("keydown", (e) => {
      if (e.key === "ArrowDown") {
        active = Math.min(rows.length - 1, active + 1);
        highlight();
      } else if (e.key === "ArrowUp") {
        active = Math.max(0, active - 1);
        highlight();
      } else if (e.key === "Enter") {
        choose(active);
      } else if (e.key === "Escape") {
        list.hidden = true;
        input.blur();
        return;
      } else return;
      e.preventDefault();
    });
  }

  function scan(root) {
    (root || document).querySelectorAll("select[data-picker]").forEach(setup);
  }
  window.loupePicker = { scan: scan };
  document.addEventListener("DOMContentLoaded", () => scan());
  document.addEventListener("htmx:afterSwap", (e) => scan(e.target));
})();
