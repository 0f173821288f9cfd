// Draws a Dashboard (schemas/dashboard.py) with plotly.js: the job table, one plot per run, the
// per-job plots. "live" mode (/ui) fetches ui/data with the bearer token and polls while jobs
// run; "static" mode (entropy-probe report) draws the dashboard embedded in the page.
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("ep-config").textContent);
  const TOKEN_KEY = "entropy-probe-token";
  const POLL_RUNNING_MS = 2000, POLL_IDLE_MS = 5000;
  const PLOT_CONFIG = { displaylogo: false, responsive: true, showLink: false,
                        modeBarButtonsToRemove: ["select2d", "lasso2d"] };
  let selected = null, timer = null, template = null;

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  };

  // Fixed point between 0.01 and 10⁴, else exponent: small estimates stay readable.
  const tiny = (a) => a !== 0 && (a < 1e-2 || a >= 1e4);
  function num(v) {
    if (v === null || v === undefined) return "";
    return (v >= 0 ? "+" : "") + (tiny(Math.abs(v)) ? v.toExponential(2) : v.toFixed(4));
  }
  const se = (s) => tiny(Math.abs(s)) ? Math.abs(s).toExponential(1) : Math.abs(s).toFixed(3);
  const pm = (v, s) => v === null || v === undefined ? "" :
    num(v) + (s === null || s === undefined ? " (SE n/a)" : " ± " + se(s));
  const seconds = (s) => s === null || s === undefined ? "" :
    s < 60 ? s.toFixed(1) + " s" : Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  const short = (path) => path ? path.split("/").filter(Boolean).pop() : "";
  // "run-3/checkpoint-200": the run and the checkpoint (the full path is the cell's title)
  const lastTwo = (path) => path ? path.split("/").filter(Boolean).slice(-2).join("/") : "";

  function columns(jobs) {
    const cols = [
      ["job", (j) => j.id, "id"],
      ["status", (j) => j.status + (j.progress ? " · " + j.progress : ""), "status"],
      ["checkpoint", (j) => lastTwo(j.checkpoint), ""],
      ["step", (j) => j.step === null ? "" : String(j.step), "num"],
      ["entropy", (j) => j.entropy || "", ""],
      ["δH₁ ± SE (predicted)", (j) => pm(j.delta_h1, j.delta_h1_se), "num"],
      ["ΔH ± SE (realized)", (j) => pm(j.delta_h, j.delta_h_se), "num"],
    ];
    if (jobs.some((j) => j.delta_j1 !== null && j.delta_j1 !== undefined))
      cols.push(["δJ₁ ± SE (reward)", (j) => pm(j.delta_j1, j.delta_j1_se), "num"]);
    cols.push(["duration", (j) => seconds(j.duration_s), "num"]);
    return cols;
  }

  function renderTable(jobs) {
    const table = $("ep-jobs"), head = table.tHead, body = table.tBodies[0];
    const cols = columns(jobs);
    head.replaceChildren(el("tr"));
    for (const [name] of cols) head.rows[0].appendChild(el("th", {}, name));
    body.replaceChildren();
    for (const job of jobs) {
      const tr = el("tr", { "data-job": job.id });
      if (job.id === selected) tr.className = "selected";
      for (const [name, cell, cls] of cols) {
        const td = el("td", cls ? { class: cls } : {});
        if (cls === "status") td.appendChild(el("span", { class: "badge " + job.status },
                                                cell(job)));
        else td.textContent = cell(job);
        if (name === "checkpoint" && job.checkpoint) td.title = job.checkpoint;
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => choose(job.id));
      body.appendChild(tr);
      if (job.error) {
        const err = el("tr", { class: "error-row" });
        err.appendChild(el("td", { class: "err", colspan: String(cols.length) }, job.error));
        body.appendChild(err);
      }
    }
    $("ep-no-jobs").hidden = jobs.length > 0;
  }

  // Plotly sizes a plot when it is drawn; a grid cell changes width when plots come or go.
  const resizer = new ResizeObserver((entries) => {
    for (const entry of entries) if (entry.target.data) Plotly.Plots.resize(entry.target);
  });

  // Keeps one div per key inside `box`, in order, redrawn with Plotly.react (no flicker). All
  // divs exist before any is drawn, so each is drawn at its final width.
  function plots(box, items) {
    const keep = new Set(items.map(([key]) => key));
    for (const child of Array.from(box.children))
      if (!keep.has(child.dataset.key)) { resizer.unobserve(child); Plotly.purge(child);
                                          child.remove(); }
    const divs = items.map(([key]) => {
      let div = Array.from(box.children).find((c) => c.dataset.key === key);
      if (!div) {
        div = el("div", { class: "plot", "data-key": key });
        box.appendChild(div);
      }
      return div;
    });
    items.forEach(([key, figure], i) => {
      const div = divs[i], fresh = !div.data;
      Plotly.react(div, figure.data, Object.assign({}, figure.layout, { template }),
                   PLOT_CONFIG);
      if (fresh) {
        resizer.observe(div);
        div.on("plotly_click", (ev) => {
          const id = ev.points && ev.points[0] && ev.points[0].customdata;
          if (typeof id === "string") choose(id);
        });
      }
    });
  }

  function renderDetails(details, jobs) {
    const box = $("ep-details");
    const ids = Object.keys(details);
    for (const child of Array.from(box.children))
      if (child.dataset.job && !ids.includes(child.dataset.job)) {
        child.querySelectorAll(".plot").forEach((p) => { resizer.unobserve(p); Plotly.purge(p); });
        child.remove();
      }
    for (const id of ids) {
      let section = Array.from(box.children).find((c) => c.dataset.job === id);
      if (!section) {
        section = el("div", { class: "job-detail", "data-job": id, id: "job-" + id });
        const h = el("h2", {}, "Job ");
        h.appendChild(el("code", {}, id));
        const job = jobs.find((j) => j.id === id);
        if (job && job.checkpoint)
          h.append(" · " + short(job.checkpoint) +
                   (job.step === null ? "" : " · step " + job.step));
        section.append(h, el("div", { class: "grid" }));
        box.appendChild(section);
      }
      const d = details[id], items = [];
      if (d.lr_curve) items.push(["lr", d.lr_curve]);
      if (d.memory) items.push(["memory", d.memory]);
      plots(section.querySelector(".grid"), items);
    }
  }

  // The chosen job has no plots yet (queued, running, failed without a trace): say so.
  function noPlotsNote(dash) {
    const box = $("ep-details");
    let note = $("ep-no-plots");
    const show = selected !== null && !(selected in dash.details);
    if (show && !note) {
      note = el("p", { id: "ep-no-plots", class: "empty" });
      box.prepend(note);
    }
    if (note) {
      note.hidden = !show;
      const job = dash.jobs.find((j) => j.id === selected);
      if (show) note.textContent = "Job " + selected + " has no plots yet (" +
        (job ? job.status + (job.progress ? ": " + job.progress : "") : "not listed") + ").";
    }
  }

  function render(dash) {
    template = dash.template;
    selected = dash.selected !== null ? dash.selected : selected;
    renderTable(dash.jobs);
    plots($("ep-runs"), dash.runs.map((r) => ["run:" + r.run + ":" + r.entropy, r.figure]));
    $("ep-no-runs").hidden = dash.runs.length > 0;
    renderDetails(dash.details, dash.jobs);
    noPlotsNote(dash);
  }

  function status(text, bad) {
    const s = $("ep-status");
    s.textContent = text;
    s.className = "status" + (bad ? " bad" : "");
  }

  function choose(id) {
    selected = id;
    if (config.mode === "live") return refresh();
    const target = $("job-" + id);
    if (target) target.scrollIntoView({ behavior: "smooth" });
  }

  async function refresh() {
    clearTimeout(timer);
    const token = sessionStorage.getItem(TOKEN_KEY);
    const url = config.data_url + (selected ? "?job=" + encodeURIComponent(selected) : "");
    let response;
    try {
      response = await fetch(url, { cache: "no-store",
                                    headers: token ? { Authorization: "Bearer " + token } : {} });
    } catch (err) {
      status("the service did not answer (" + err.message + "); retrying", true);
      timer = setTimeout(refresh, POLL_IDLE_MS);
      return;
    }
    if (response.status === 401) return askToken(token ? "that token was refused" : "");
    if (!response.ok) {
      status("ui/data answered HTTP " + response.status + "; retrying", true);
      timer = setTimeout(refresh, POLL_IDLE_MS);
      return;
    }
    const dash = await response.json();
    $("ep-token").hidden = true;
    $("ep-main").hidden = false;
    render(dash);
    const when = new Date().toLocaleTimeString();
    status(dash.jobs.length + " jobs · " + (dash.unfinished ? dash.unfinished +
           " unfinished, refreshing every " + POLL_RUNNING_MS / 1000 + " s" : "all finished")
           + " · updated " + when);
    timer = setTimeout(refresh, dash.unfinished ? POLL_RUNNING_MS : POLL_IDLE_MS);
  }

  function askToken(problem) {
    $("ep-main").hidden = true;
    $("ep-token").hidden = false;
    $("ep-token-error").textContent = problem;
    status("waiting for the API token", !!problem);
    $("ep-token-input").focus();
  }

  $("ep-token").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("ep-token-input").value);
    refresh();
  });

  if (config.mode === "live") {
    refresh();
  } else {
    render(config.dashboard);
    status(config.dashboard.jobs.length + " jobs · report written " + config.written);
  }
})();
