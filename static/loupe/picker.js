// Type-ahead class picker over a label editor's <select data-picker>: instant with thousands of classes (one
// array filtered per key press, at most 50 rows drawn), keyboard driven (type, ↑/↓, Enter, Esc), hierarchy-aware
// (a child head — model — lists only the children of its parent head's current class — make —, and picking a
// child whose parent differs sets the parent first), and admins may create a class that does not exist yet —
// never by a bare Enter: names that match loosely (arch1x4 ~ arch_1x4, one typo) are listed first and highlighted,
// the "+ create" row comes last, and choosing it asks once ("Enter again creates it, Esc cancels").
// On the review page (<select data-picker data-event>) a choice is not submitted: the picker fires a bubbling
// "picker:choose" event ({detail: {id, name}}) and review.js decides; options may carry data-parent-name (shown
// beside the name and searched too: typing a make lists its models).
(function () {
  "use strict";
  const MAX_ROWS = 50;

  function norm(s) {
    return s.toLowerCase().normalize("NFKD").replace(/[\u0300-\u036f]/g, "");
  }

  function loose(s) {
    return s.replace(/[^\p{L}\p{N}]+/gu, ""); // arch_1x4, "arch 1x4", arch-1x4 -> arch1x4
  }

  // Damerau-Levenshtein distance of a and b if it is at most `max`, else max + 1 (banded, stops early).
  function within(a, b, max) {
    if (Math.abs(a.length - b.length) > max) return max + 1;
    let prev2 = null;
    let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
    for (let i = 1; i <= a.length; i++) {
      const cur = [i];
      let best = i;
      for (let j = 1; j <= b.length; j++) {
        const cost = a[i - 1] === b[j - 1] ? 0 : 1;
        let d = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost);
        if (prev2 && i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d = Math.min(d, prev2[j - 2] + 1);
        cur.push(d);
        if (d < best) best = d;
      }
      if (best > max) return max + 1;
      prev2 = prev;
      prev = cur;
    }
    return prev[b.length];
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
        loose: loose(norm(o.textContent)),
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
    let asking = ""; // the name of the new class the admin is asked to confirm

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
      const similar = []; // the same letters and digits: arch1x4 finds arch_1x4
      const lq = loose(q);
      for (const o of pool) {
        const at = o.key.indexOf(q);
        if (at === 0) starts.push(o);
        else if (at > 0) contains.push(o);
        else if (lq && o.loose.indexOf(lq) >= 0) similar.push(o);
        if (starts.length >= limit) break;
      }
      const hits = starts.concat(contains, similar).slice(0, limit);
      if (hits.length || lq.length < 4) return hits;
      // nothing contains it: names one typo away (two for long names), nearest first
      const max = lq.length >= 8 ? 2 : 1;
      return pool
        .map((o) => [within(lq, o.loose, max), o])
        .filter(([d]) => d <= max)
        .sort((x, y) => x[0] - y[0])
        .slice(0, limit)
        .map(([, o]) => o);
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
      // last, so never the default highlight while any class matches; choosing it asks first (choose())
      if (q && !exact && select.dataset.canCreate === "1") rows.push({ kind: "create", name: input.value.trim() });
      if (!rows.some((row) => row.kind === "create" && row.name === asking)) asking = "";
      list.innerHTML = "";
      rows.forEach((row, i) => {
        const li = document.createElement("li");
        li.setAttribute("role", "option");
        const other = row.kind === "pick" && parent && row.option.parent && row.option.parent !== parent;
        li.textContent =
          row.kind === "create"
            ? asking === row.name
              ? "Create “" + row.name + "” as a new " + select.dataset.head + " class" + createUnder() + "? Enter creates it · Esc cancels"
              : "+ create “" + row.name + "”…"
            : row.option.name +
              (other ? " (" + parentName(row.option.parent) + ")" : row.option.parentName ? " (" + row.option.parentName + ")" : "");
        if (row.kind === "create") li.className = asking === row.name ? "create confirm" : "create";
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

    function createUnder() {
      const parent = parentFilter();
      return parent ? " under " + parentName(parent) : "";
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
      if (row.kind === "create" && asking !== row.name) {
        asking = row.name; // ask once; the same choice again (Enter, click) creates
        active = i;
        render();
        return;
      }
      list.hidden = true;
      if (row.kind === "create") {
        asking = "";
        const body = new FormData();
        body.set("name", row.name);
        body.set("confirm", "1");
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
      asking = "";
      render();
    });
    input.addEventListener("blur", () =>
      setTimeout(() => {
        list.hidden = true;
        asking = "";
      }, 150),
    );
    input.addEventListener("keydown", (e) => {
      if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        active = e.key === "ArrowDown" ? Math.min(rows.length - 1, active + 1) : Math.max(0, active - 1);
        if (asking) {
          asking = ""; // moving away cancels the question
          render();
        } else highlight();
      } else if (e.key === "Enter") {
        choose(active);
      } else if (e.key === "Escape" && asking) {
        asking = ""; // cancel the new class, keep typing
        render();
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
