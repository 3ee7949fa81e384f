// The ops dashboard's refresh: every 5 s, GET /ops/data.json (the same cookie as the page)
// and write each figure into the element whose data-k names its path ("db.in_use",
// "task_counts.succeeded", "cron.0.last_start"). Without JavaScript the page reloads
// itself every 10 s instead (<noscript> meta refresh). Served from /ops/dashboard.js:
// the page's Content-Security-Policy allows no inline script.
"use strict";

(function () {
  const PERIOD_MS = 5000;
  const status = () => document.getElementById("refreshed");

  function pick(data, path) {
    let value = data;
    for (const part of path.split(".")) {
      if (value === null || value === undefined || typeof value !== "object") return undefined;
      value = value[part];
    }
    return value;
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function show(el, value) {
    if (value === undefined) return; // a source that is unavailable keeps its last figure
    let text;
    if (value === null) text = "–";
    else if (el.hasAttribute("data-time")) {
      const d = new Date(value * 1000);
      text = `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
        `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
    } else if (el.hasAttribute("data-seconds")) text = `${Number(value).toFixed(3)} s`;
    else text = String(value);
    if (el.textContent !== text) el.textContent = text;
  }

  async function refresh() {
    const line = status();
    try {
      const resp = await fetch("/ops/data.json", {credentials: "same-origin", cache: "no-store"});
      if (resp.status === 401 || resp.status === 403) {
        window.location.assign("/ops/login"); // the session ended
        return;
      }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const data = await resp.json();
      for (const el of document.querySelectorAll("[data-k]")) {
        show(el, pick(data, el.getAttribute("data-k")));
      }
      if (line) {
        line.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
        line.setAttribute("data-state", "live");
      }
    } catch (err) {
      if (line) {
        line.textContent = `Refresh failed: ${err.message}; retrying.`;
        line.setAttribute("data-state", "failed");
      }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    refresh();
    window.setInterval(refresh, PERIOD_MS);
  });
})();
