(function () {
  "use strict";
  var body = document.body;
  window.addEventListener("error", function (ev) {
    body.setAttribute("data-js-error", String(ev.message || "error"));
  });
  var viewer = document.getElementById("viewer");
  var big = document.getElementById("viewer-img");
  var key = document.getElementById("viewer-key");
  var prompt = document.getElementById("viewer-prompt");
  var rows = document.getElementById("viewer-scores");
  function close() {
    viewer.hidden = true;
    big.removeAttribute("src");
  }
  function open(link) {
    big.setAttribute("src", link.getAttribute("href"));
    key.textContent = link.getAttribute("data-key") || "";
    prompt.textContent = link.getAttribute("data-prompt") || "";
    while (rows.firstChild) { rows.removeChild(rows.firstChild); }
    var scores = JSON.parse(link.getAttribute("data-scores") || "{}");
    Object.keys(scores).forEach(function (name) {
      var tr = document.createElement("tr");
      var th = document.createElement("th");
      var td = document.createElement("td");
      th.textContent = name;
      var v = scores[name];
      td.textContent = v === null ? "\u2013" : (typeof v === "number" ? v.toFixed(4) : String(v));
      tr.appendChild(th);
      tr.appendChild(td);
      rows.appendChild(tr);
    });
    viewer.hidden = false;
  }
  document.addEventListener("click", function (ev) {
    var link = ev.target.closest ? ev.target.closest("a.shot") : null;
    if (link) {
      ev.preventDefault();
      open(link);
    } else if (!viewer.hidden && (ev.target === viewer || ev.target.id === "viewer-close")) {
      close();
    }
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape" && !viewer.hidden) { close(); }
  });
  window.addEventListener("load", function () {
    var broken = 0;
    Array.prototype.forEach.call(document.images, function (img) {
      if (img.id !== "viewer-img" && img.complete && img.naturalWidth === 0) { broken += 1; }
    });
    body.setAttribute("data-broken-images", String(broken));
    body.setAttribute("data-images", String(document.images.length - 1));
  });
  body.setAttribute("data-report-ready", "1");
})();
