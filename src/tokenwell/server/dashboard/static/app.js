// The dashboard's little script: confirm before revoking, and the live list of
// requests in flight (polled; the page works without it).
"use strict";
(function () {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  const live = document.getElementById("live");
  if (!live) return;
  const body = live.querySelector("tbody");
  const count = document.getElementById("live-count");
  const cell = (row, text) => { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); };
  async function poll() {
    try {
      const r = await fetch("/dashboard/live", { credentials: "same-origin" });
      if (!r.ok) return;
      const running = (await r.json()).data;
      body.innerHTML = "";
      count.textContent = "(" + running.length + ")";
      if (!running.length) {
        const row = document.createElement("tr");
        const td = document.createElement("td");
        td.colSpan = 6; td.className = "empty"; td.textContent = "None.";
        row.appendChild(td); body.appendChild(row);
      }
      for (const r of running) {
        const row = document.createElement("tr");
        row.dataset.requestId = r.id;
        cell(row, r.id); cell(row, r.key_name + " (" + r.key_id + ")"); cell(row, r.model);
        cell(row, r.api); cell(row, r.seconds + " s"); cell(row, String(r.completion_tokens));
        body.appendChild(row);
      }
    } finally {
      setTimeout(poll, 1000);
    }
  }
  poll();
})();
