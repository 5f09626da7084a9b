// Sortable tables: click a header of a `table.sortable` to sort its rows by that column, again to reverse.
// Headers say how with data-sort="num" (cells' data-value, blanks last) or "text"; no framework.
(function () {
  function key(cell, numeric) {
    if (!numeric) return cell.textContent.trim().toLowerCase();
    const raw = cell.dataset.value ?? cell.textContent;
    const v = parseFloat(raw);
    return Number.isNaN(v) ? null : v;
  }
  function sort(table, th) {
    const col = Array.from(th.parentNode.children).indexOf(th);
    const numeric = th.dataset.sort === "num";
    const down = th.getAttribute("aria-sort") !== (numeric ? "descending" : "ascending");
    const dir = down === numeric ? -1 : 1; // numbers first sort high to low, text A to Z
    const body = table.tBodies[0];
    const rows = Array.from(body.rows).map((row, i) => ({ row, i, k: key(row.cells[col], numeric) }));
    rows.sort((a, b) => {
      if (a.k === b.k) return a.i - b.i;
      if (a.k === null) return 1;
      if (b.k === null) return -1;
      return (a.k < b.k ? -1 : 1) * dir;
    });
    rows.forEach(({ row }) => body.appendChild(row));
    table.querySelectorAll("th[aria-sort]").forEach((h) => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  }
  function init() {
    document.querySelectorAll("table.sortable thead th[data-sort]").forEach((th) => {
      th.tabIndex = 0;
      th.title = "Sort by " + th.textContent.trim();
      const table = th.closest("table");
      th.addEventListener("click", () => sort(table, th));
      th.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(table, th); }
      });
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
