// Small progressive enhancements; every page works without them.
"use strict";
(function () {
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
    });
  });
  document.querySelectorAll("[data-select-on-focus]").forEach(function (input) {
    input.addEventListener("focus", function () { input.select(); });
  });

  // The theme toggle: a pressed button means dark; the choice is kept in localStorage, and until
  // one is made the page follows prefers-color-scheme.
  var toggle = document.getElementById("theme-toggle");
  if (toggle) {
    var root = document.documentElement;
    var system = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
    var isDark = function () {
      var chosen = root.getAttribute("data-theme");
      return chosen ? chosen === "dark" : !!(system && system.matches);
    };
    var show = function () { toggle.setAttribute("aria-pressed", isDark() ? "true" : "false"); };
    toggle.hidden = false;
    show();
    if (system && system.addEventListener) system.addEventListener("change", show);
    toggle.addEventListener("click", function () {
      var next = isDark() ? "light" : "dark";
      root.setAttribute("data-theme", next);
      try { window.localStorage.setItem("console-theme", next); } catch (e) { /* not kept */ }
      show();
    });
  }

  // Phone cards name each cell by its column: fill in the labels the templates left out.
  document.querySelectorAll(".scroll table").forEach(function (table) {
    var heads = Array.prototype.map.call(table.querySelectorAll("thead th"), function (th) { return th.textContent.trim(); });
    table.querySelectorAll("tbody tr").forEach(function (row) {
      Array.prototype.forEach.call(row.children, function (cell, i) {
        if (!cell.hasAttribute("data-label") && heads[i] && cell.getAttribute("colspan") === null) cell.setAttribute("data-label", heads[i]);
      });
    });
  });

  // Copy buttons (a new key's or endpoint's secret): shown only where the script runs.
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var id = button.getAttribute("data-copy");
    var input = document.getElementById(id);
    var status = document.querySelector('[data-copy-status="' + id + '"]');
    if (!input) return;
    button.hidden = false;
    button.addEventListener("click", function () {
      function done(ok) {
        if (status) status.textContent = ok ? "Copied to the clipboard." : "Copy failed: select the text and copy it.";
        if (!ok) { input.focus(); input.select(); }
      }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(function () { done(true); }, function () { done(false); });
      } else {
        input.focus();
        input.select();
        var ok = false;
        try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
        done(ok);
      }
    });
  });

  // Upstream health, refreshed live where the table asks for it.
  var table = document.querySelector("table[data-live]");
  if (!table) return;
  var stamp = document.getElementById("upstreams-updated");
  function pct(v) { return ((v || 0) * 100).toFixed(1) + " %"; }
  function show(v) { return v === null || v === undefined ? "—" : String(typeof v === "number" ? Math.round(v) : v); }
  function refresh() {
    fetch(table.getAttribute("data-live"), { headers: { accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (body) {
        body.data.forEach(function (u) {
          var row = table.querySelector('tr[data-name="' + CSS.escape(u.name) + '"]');
          if (!row) return;
          row.querySelector('[data-field="state"]').innerHTML = "";
          var badge = document.createElement("span");
          badge.className = "state state-" + u.state;
          badge.textContent = u.state;
          row.querySelector('[data-field="state"]').appendChild(badge);
          row.querySelector('[data-field="in_flight"]').textContent = show(u.in_flight);
          row.querySelector('[data-field="latency_p50_ms"]').textContent = show(u.latency_p50_ms);
          row.querySelector('[data-field="latency_avg_ms"]').textContent = show(u.latency_avg_ms);
          row.querySelector('[data-field="error_rate"]').textContent = pct(u.error_rate);
          row.querySelector('[data-field="requests_in_window"]').textContent = show(u.requests_in_window);
        });
        table.setAttribute("data-refreshed", String(Date.now()));
        if (stamp) stamp.textContent = "Updated " + new Date().toLocaleTimeString();
      })
      .catch(function () { if (stamp) stamp.textContent = "Refresh failed; retrying."; });
  }
  setInterval(refresh, 2000);
})();
