// mailpipe dashboard: start a fetch, follow it live, refresh the sections, draw the trend chart.
// No library and nothing from the internet: the page must work behind a strict CSP.
(() => {
  "use strict";

  const POLL_MS = 1000;
  const CHECK_WAIT_MS = 130000; // the check's time limit on the worker (120 s) and a little
  const REFRESHED = ["jobs", "accounts", "trend", "notifications"];
  const PHASES = ["connect", "diagnostics", "folder_list", "fetch", "parse", "process", "save", "disconnect"];
  const RELATIVE_MS = 30000; // how often "vor 2 Min." is said again
  const RELATIVE_STEPS = [
    [60, "second", 1],
    [3600, "minute", 60],
    [86400, "hour", 3600],
    [7 * 86400, "day", 86400],
  ];
  const SVG = "http://www.w3.org/2000/svg";

  let page = readPageData(document);
  const T = page.texts;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function readPageData(doc) {
    return JSON.parse(doc.getElementById("page-data").textContent);
  }

  function format(template, values) {
    return template.replace(/\{(\w+)\}/g, (_, name) => String(values[name]));
  }

  function number(value, digits) {
    return new Intl.NumberFormat(page.lang, {
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    }).format(value);
  }

  async function api(path, method = "GET", body = undefined) {
    const url = new URL(path, window.location.origin);
    url.searchParams.set("lang", page.lang);
    const headers = { Accept: "application/json" };
    if (method === "POST") {
      headers["X-CSRF-Token"] = csrf;
      headers["Content-Type"] = "application/json";
    }
    const response = await fetch(url, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, data };
  }

  function errorText(result) {
    const key = "error_" + (result.data.code || "generic");
    return T[key] || T.error_generic;
  }

  // -- times in the reader's own time zone -------------------------------------------------

  // Within a week: "vor 2 Min." / "2 min. ago"; older: the date. The exact time is the title.
  function ago(when, relative) {
    const seconds = (when.getTime() - Date.now()) / 1000;
    for (const [limit, unit, size] of RELATIVE_STEPS) {
      if (Math.abs(seconds) < limit) return relative.format(Math.round(seconds / size), unit);
    }
    return null;
  }

  function localTimes(root) {
    const shown = new Intl.DateTimeFormat(page.lang, { dateStyle: "short", timeStyle: "short" });
    const relative = new Intl.RelativeTimeFormat(page.lang, { numeric: "auto", style: "short" });
    for (const element of root.querySelectorAll("time[datetime]")) {
      const iso = element.getAttribute("datetime");
      if (!iso) continue;
      const when = new Date(iso);
      if (Number.isNaN(when.getTime())) continue;
      element.textContent = ago(when, relative) ?? shown.format(when);
      element.title = shown.format(when);
    }
  }

  // -- live progress of one job ------------------------------------------------------------

  const button = document.getElementById("fetch-now");
  const message = document.getElementById("fetch-message");
  const progress = document.getElementById("progress");

  // In the order a run goes through them; under 10 ms with a tenth, so nothing reads "0 ms".
  function phasesText(phases) {
    return PHASES.filter((phase) => phases && phase in phases)
      .map((phase) => {
        const ms = phases[phase] * 1000;
        const shown = ms < 0.1 ? `<${number(0.1, 1)}` : number(ms, ms < 10 ? 1 : 0);
        return `${phase} ${shown} ms`;
      })
      .join(" · ");
  }

  function renderProgress(job, detail = false) {
    progress.hidden = false;
    progress.dataset.status = job.status;
    progress.dataset.final = String(job.final);
    progress.dataset.job = job.job_id;
    const title = job.final ? job.status_text : T.fetch_running;
    document.getElementById("progress-title").textContent = detail
      ? `${format(T.job_detail, { job: job.job_id.slice(0, 8) })}: ${title}`
      : title;
    document.getElementById("progress-count").textContent = format(T.progress, job.progress);
    document.getElementById("progress-reason").textContent = job.reason_text || "";
    const share = job.progress.total ? job.progress.done / job.progress.total : 1;
    document.getElementById("progress-fill").style.width = `${Math.round(share * 100)}%`;
    const list = document.getElementById("progress-accounts");
    list.replaceChildren(
      ...job.accounts.map((run) => {
        const item = document.createElement("li");
        item.className = `run status-${run.status}`;
        const name = document.createElement("span");
        name.className = "run-name";
        name.textContent = run.label;
        const state = document.createElement("span");
        state.className = `badge status-${run.status}`;
        state.textContent = run.status_text;
        const detail = document.createElement("span");
        detail.className = "run-detail";
        if (run.message) {
          detail.textContent = run.message;
          detail.classList.add("error");
        } else if (run.status === "success") {
          detail.textContent = `${run.fetched} ${T.mails}`;
          if (run.duration !== null) detail.textContent += ` · ${number(run.duration, 2)} s`;
        }
        const phases = document.createElement("span");
        phases.className = "run-phases";
        phases.textContent = phasesText(run.phases);
        item.append(name, state, detail, phases);
        return item;
      }),
    );
  }

  async function follow(jobId, detail = false) {
    button.disabled = true;
    try {
      for (;;) {
        const result = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
        if (!result.ok) {
          message.textContent = errorText(result);
          return;
        }
        renderProgress(result.data, detail);
        if (result.data.final) return;
        await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      }
    } finally {
      button.disabled = false;
      await refresh();
    }
  }

  async function fetchNow() {
    message.textContent = "";
    button.disabled = true;
    const result = await api("/api/jobs/fetch", "POST", {});
    if (!result.ok) {
      button.disabled = false;
      message.textContent = errorText(result);
      return;
    }
    await follow(result.data.job_id);
  }

  // -- refresh the server-rendered sections ------------------------------------------------

  async function refresh() {
    const response = await fetch(window.location.href, { credentials: "same-origin" });
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const id of REFRESHED) {
      const replacement = fresh.getElementById(id);
      if (replacement) document.getElementById(id).replaceWith(document.adoptNode(replacement));
    }
    page = readPageData(fresh);
    drawTrend(page.trend);
    localTimes(document);
    bindSections();
  }

  // -- account checks and notifications ----------------------------------------------------

  // The check runs on a worker: start it, then poll its request until it is done. The card is
  // looked up each time, as a refresh of the sections may have replaced it meanwhile.
  async function checkAccount(target) {
    const account = target.dataset.account;
    const show = (words, failed, status) => {
      const result = document.querySelector(`article.account[data-account="${account}"] .check-result`);
      if (!result) return;
      result.textContent = words;
      result.classList.toggle("error", failed);
      result.dataset.status = status;
    };
    show(T.checking, false, "starting");
    target.disabled = true;
    try {
      const started = await api(`/api/accounts/${account}/diagnostics`, "POST");
      if (!started.ok) {
        show(errorText(started), true, "error");
        return;
      }
      const began = Date.now();
      for (;;) {
        await new Promise((resolve) => setTimeout(resolve, POLL_MS));
        const answer = await api(started.data.status_url);
        if (!answer.ok) {
          show(errorText(answer), true, "error");
          return;
        }
        const check = answer.data;
        if (check.status === "done" && check.ok) {
          const figures = {
            connect: number(check.connect_seconds, 2),
            rtt: number(check.round_trip_seconds, 3),
          };
          show(format(T.check_ok, figures), false, check.status);
          return;
        }
        if (check.status === "done") {
          const words = format(T.check_failed, { message: check.message || T.error_generic });
          show(words, true, check.status);
          return;
        }
        if (check.status !== "pending") {
          show(check.message || T.error_generic, true, check.status);
          return;
        }
        if (Date.now() - began > CHECK_WAIT_MS) {
          show(T.check_no_answer, true, "no_answer");
          return;
        }
        const seconds = Math.round((Date.now() - began) / 1000);
        show(format(T.check_pending, { seconds }), false, check.status);
      }
    } finally {
      target.disabled = false;
    }
  }

  async function markRead(target) {
    const path = target.id === "mark-all-read"
      ? "/api/notifications/read-all"
      : `/api/notifications/${target.dataset.note}/read`;
    const answer = await api(path, "POST");
    if (answer.ok) await refresh();
  }

  // A job of the history, on click: its per-account outcomes, phase timings and errors.
  async function showJob(target) {
    await follow(target.dataset.job, true);
    progress.scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  // Push on or off: the answer is the account as its card shows it; the sections refresh.
  async function togglePush(target) {
    target.disabled = true;
    const enabled = target.dataset.push !== "on";
    const answer = await api(`/api/accounts/${target.dataset.account}/push`, "POST", { enabled });
    if (answer.ok) await refresh();
    else target.disabled = false;
  }

  function bindSections() {
    for (const target of document.querySelectorAll(".job-detail")) {
      target.addEventListener("click", () => showJob(target));
    }
    for (const target of document.querySelectorAll(".check-account")) {
      target.addEventListener("click", () => checkAccount(target));
    }
    for (const target of document.querySelectorAll(".toggle-push")) {
      target.addEventListener("click", () => togglePush(target));
    }
    for (const target of document.querySelectorAll(".mark-read, #mark-all-read")) {
      target.addEventListener("click", () => markRead(target));
    }
  }

  // -- 7-day trend: bars for mails, a line for the average fetch time ----------------------

  function svg(name, attributes, text) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
    if (text !== undefined) element.textContent = text;
    return element;
  }

  // Four grid steps of a round size (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten).
  function niceStep(max, whole) {
    if (max <= 0) return whole ? 1 : 0.5;
    const raw = max / 4;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((s) => s * magnitude).find((s) => s >= raw);
    return whole ? Math.max(1, Math.ceil(step)) : step;
  }

  function decimals(step) {
    const isWhole = (value) => Math.abs(value - Math.round(value)) < 1e-9;
    if (isWhole(step)) return 0;
    return isWhole(step * 10) ? 1 : 2;
  }

  function drawTrend(trend) {
    const width = 560;
    const height = 220;
    const pad = { left: 40, right: 44, top: 14, bottom: 30 };
    const inner = { w: width - pad.left - pad.right, h: height - pad.top - pad.bottom };
    const mailStep = niceStep(Math.max(0, ...trend.map((d) => d.emails)), true);
    const secondStep = niceStep(Math.max(0, ...trend.map((d) => d.avg_duration || 0)), false);
    const maxMails = mailStep * 4;
    const maxSeconds = secondStep * 4;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "trend-svg" });
    const slot = inner.w / trend.length;
    const y = (value, max) => pad.top + inner.h - (value / max) * inner.h;

    for (let i = 0; i <= 4; i += 1) {
      const level = pad.top + (inner.h * i) / 4;
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: level, y2: level, class: "grid" }));
      const mails = mailStep * (4 - i);
      const seconds = secondStep * (4 - i);
      chart.append(svg("text", { x: pad.left - 6, y: level + 4, class: "axis mails" }, number(mails, 0)));
      chart.append(
        svg(
          "text",
          { x: width - pad.right + 6, y: level + 4, class: "axis seconds" },
          number(seconds, decimals(secondStep)),
        ),
      );
    }
    const day = new Intl.DateTimeFormat(page.lang, { weekday: "short", day: "numeric" });
    const points = [];
    trend.forEach((entry, index) => {
      const x = pad.left + slot * index;
      const top = y(entry.emails, maxMails);
      const bar = svg("rect", {
        x: x + slot * 0.2,
        y: top,
        width: slot * 0.6,
        height: pad.top + inner.h - top,
        class: "bar-mails",
      });
      bar.append(svg("title", {}, `${entry.date}: ${format(T.trend_day, entry)}`));
      chart.append(bar);
      const label = day.format(new Date(`${entry.date}T12:00:00Z`));
      chart.append(svg("text", { x: x + slot / 2, y: height - 10, class: "axis day" }, label));
      if (entry.avg_duration !== null) points.push([x + slot / 2, y(entry.avg_duration, maxSeconds), entry]);
    });
    if (points.length > 1) {
      chart.append(svg("polyline", { points: points.map((p) => `${p[0]},${p[1]}`).join(" "), class: "line-duration" }));
    }
    for (const [cx, cy, entry] of points) {
      const dot = svg("circle", { cx, cy, r: 4, class: "dot-duration" });
      dot.append(svg("title", {}, `${entry.date}: ${number(entry.avg_duration, 2)} s`));
      chart.append(dot);
    }
    document.getElementById("trend-chart").replaceChildren(chart);
  }

  button.addEventListener("click", fetchNow);
  bindSections();
  drawTrend(page.trend);
  localTimes(document);
  setInterval(() => localTimes(document), RELATIVE_MS);
  if (page.running) follow(page.running);
})();
