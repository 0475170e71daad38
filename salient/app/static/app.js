// The annotation pages: the worker id (kept in this browser), progress, and posting answers as JSON.
"use strict";

(function () {
  const KEY = "salient.worker_id";
  const WORKER_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
  const $ = (id) => document.getElementById(id);

  function worker() {
    const w = localStorage.getItem(KEY) || "";
    return WORKER_ID.test(w) ? w : "";
  }

  function showWorker() {
    const w = worker();
    $("worker-name").textContent = w || "not set";
    $("change-worker").hidden = !w;
    const row = $("worker-row");
    if (row) {
      row.hidden = Boolean(w);
      $("worker-id").required = !w;
    }
  }

  function shownPairs() {
    const form = $("answer-form");
    if (form) return [`${form.dataset.classIndex}/${form.dataset.featureIndex}`];
    return Array.from(document.querySelectorAll("tr[data-pair]"), (row) => row.dataset.pair);
  }

  async function progress() {
    const w = worker();
    const query = new URLSearchParams();
    if (w) {
      query.set("worker_id", w);
      query.set("pairs", shownPairs().join(","));
    }
    const response = await fetch("/api/progress" + (w ? "?" + query : ""));
    if (!response.ok) return null;
    const p = await response.json();
    $("progress").textContent = w
      ? `${p.labelled_by_you} of ${p.pairs} labelled by you`
      : `${p.open} of ${p.pairs} pairs need answers`;
    const mine = new Set(p.answered);
    for (const row of document.querySelectorAll("tr[data-pair]")) {
      const cell = row.querySelector("td.mine");
      if (cell) cell.textContent = mine.has(row.dataset.pair) ? "\u2713 labelled" : "";
    }
    const start = $("start");
    if (start) {
      if (p.next) start.href = p.next;
      else start.hidden = true;
    }
    return p;
  }

  function say(text, kind) {
    const status = $("status");
    status.textContent = text;
    status.className = kind;
  }

  function problems(body) {
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${d.loc[d.loc.length - 1]}: ${d.msg}`).join("; ");
    return "the answer was not saved";
  }

  async function submit(event) {
    event.preventDefault();
    const form = event.target;
    let w = worker();
    if (!w) {
      const given = $("worker-id").value.trim();
      if (!WORKER_ID.test(given)) {
        say("Enter your worker id: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.", "error");
        $("worker-id").focus();
        return;
      }
      localStorage.setItem(KEY, given);
      w = given;
      showWorker();
    }
    const data = new FormData(form);
    const answer = {
      worker_id: w,
      class_index: Number(form.dataset.classIndex),
      feature_index: Number(form.dataset.featureIndex),
      answer: data.get("answer"),
      confidence: Number(data.get("confidence")),
      reason: String(data.get("reason") || "").trim(),
    };
    $("submit").disabled = true;
    say("Saving\u2026", "");
    let response;
    try {
      response = await fetch("/api/answers", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(answer),
      });
    } catch (error) {
      say("The app cannot be reached; your answer was not saved. Try again.", "error");
      $("submit").disabled = false;
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (response.status === 201) {
      say(`Saved (${body.n_answers} of ${body.needed} answers). ${body.labelled_by_you} of ${body.pairs} labelled by you.`, "ok");
      window.location.assign(body.next || "/");
    } else if (response.status === 409) {
      say(body.detail + (body.next ? "; moving on to the next pair" : ""), "error");
      if (body.next) setTimeout(() => window.location.assign(body.next), 1500);
    } else {
      say(problems(body), "error");
      $("submit").disabled = false;
    }
  }

  // The filter "answered by me" needs the worker id, which only this browser knows.
  function fillFilters() {
    const field = $("filter-worker");
    if (!field) return;
    const w = worker();
    field.value = w;
    field.disabled = !w;
    const mine = $("filter-state").querySelector('option[value="mine"]');
    mine.disabled = !w;
    mine.title = w ? "" : "label a pair first: the app then knows your worker id";
  }

  document.addEventListener("DOMContentLoaded", async () => {
    showWorker();
    fillFilters();
    $("change-worker").addEventListener("click", () => {
      localStorage.removeItem(KEY);
      window.location.reload();
    });
    const form = $("answer-form");
    if (form) form.addEventListener("submit", submit);
    const p = await progress();
    if (form && p) {
      const key = `${form.dataset.classIndex}/${form.dataset.featureIndex}`;
      if (p.answered.includes(key)) {
        $("submit").disabled = true;
        say("You labelled this pair already.", "ok");
      }
    }
  });
})();
