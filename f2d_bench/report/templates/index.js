(function () {
  "use strict";
  var body = document.body;
  window.addEventListener("error", function (ev) {
    body.setAttribute("data-js-error", String(ev.message || "error"));
  });
  var input = document.getElementById("method-filter");
  var status = document.getElementById("filter-status");
  var tables = Array.prototype.slice.call(document.querySelectorAll("table.sortable"));
  var state = new Map();  // table -> {key, type, descending}

  function units(table) { return Array.prototype.slice.call(table.tBodies); }

  function sortValue(unit, key, numeric) {
    var attr = "data-sort-" + key;
    if (unit.hasAttribute(attr)) {
      var own = unit.getAttribute(attr);
      if (!numeric) { return own.toLowerCase(); }
      return own === "" ? NaN : Number(own);
    }
    // A report's value is the best among the methods it shows (the filter hides the others).
    var best = NaN;
    Array.prototype.forEach.call(unit.querySelectorAll("[" + attr + "]"), function (el) {
      var text = el.getAttribute(attr);
      var v = Number(text);
      if (!el.hidden && text !== "" && !isNaN(v) && !(best >= v)) { best = v; }
    });
    return best;
  }

  function sortTable(table, key, type, descending) {
    var numeric = type === "num";
    var list = units(table).map(function (u, i) { return {unit: u, value: sortValue(u, key, numeric), i: i}; });
    list.sort(function (a, b) {
      if (numeric) {
        var an = isNaN(a.value), bn = isNaN(b.value);
        if (an !== bn) { return an ? 1 : -1; }  // missing values last, either way
        if (!an && a.value !== b.value) { return descending ? b.value - a.value : a.value - b.value; }
      } else if (a.value !== b.value) {
        return (a.value < b.value ? -1 : 1) * (descending ? -1 : 1);
      }
      return a.i - b.i;
    });
    list.forEach(function (x) { table.appendChild(x.unit); });
    state.set(table, {key: key, type: type, descending: descending});
    Array.prototype.forEach.call(table.querySelectorAll("button.sort"), function (b) {
      var on = b.getAttribute("data-sort-key") === key;
      b.setAttribute("data-sorted", on ? (descending ? "desc" : "asc") : "");
    });
    table.setAttribute("data-sorted-by", key + (descending ? " desc" : " asc"));
  }

  function applyFilter() {
    var q = input.value.trim().toLowerCase();
    var shownUnits = 0, allUnits = 0;
    tables.forEach(function (table) {
      units(table).forEach(function (unit) {
        var items = unit.hasAttribute("data-method-text") ? [unit]
          : Array.prototype.slice.call(unit.querySelectorAll("[data-method-text]"));
        var any = false;
        items.forEach(function (item) {
          var ok = q === "" || item.getAttribute("data-method-text").indexOf(q) >= 0;
          if (item !== unit) { item.hidden = !ok; }
          any = any || ok;
        });
        unit.hidden = q !== "" && !any;
        if (table.id === "reports-table") {
          allUnits += 1;
          if (!unit.hidden) { shownUnits += 1; }
        }
      });
      var s = state.get(table);
      if (s) { sortTable(table, s.key, s.type, s.descending); }  // a report's best visible method may change
    });
    status.textContent = q === "" ? "" : shownUnits + " of " + allUnits + " report folders shown";
    body.setAttribute("data-filter", q);
  }

  document.addEventListener("click", function (ev) {
    var button = ev.target.closest ? ev.target.closest("button.sort") : null;
    if (!button) { return; }
    var table = button.closest("table");
    var key = button.getAttribute("data-sort-key");
    var s = state.get(table);
    var descending = s && s.key === key ? !s.descending : button.getAttribute("data-sort-first") === "desc";
    sortTable(table, key, button.getAttribute("data-sort-type"), descending);
  });
  input.addEventListener("input", applyFilter);

  function fromAddress() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    if (params.has("method")) {
      input.value = params.get("method");
    }
    var key = params.get("sort");
    if (key) {
      tables.forEach(function (table) {
        var button = Array.prototype.find.call(table.querySelectorAll("button.sort"), function (b) {
          return b.getAttribute("data-sort-key") === key;
        });
        if (button) {
          var dir = params.get("dir") || button.getAttribute("data-sort-first");
          sortTable(table, key, button.getAttribute("data-sort-type"), dir === "desc");
        }
      });
    }
    applyFilter();
  }
  window.addEventListener("hashchange", fromAddress);
  fromAddress();
  body.setAttribute("data-index-ready", "1");
})();
