// The live page: polls /status.json every 2 s and draws it. Text goes in with textContent only
// (prompts and file names are other people's text), pictures by journal id, nothing is ever sent.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
let recentKey = "";
const clocks = []; // [element, ISO time] pairs whose "3 min ago" is redrawn at each poll

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function percent(value) {
  return `${Math.round(value * 100)} %`;
}

function ago(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

function units(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

function progressOf(job) {
  // The API's own figure when it gives one; else an estimate from recent jobs' times, marked "~".
  if (job.state === "downloading") return el("div", { class: "progress" }, bar(1), el("span", { text: "downloading" }));
  if (job.progress > 0) return el("div", { class: "progress" }, bar(job.progress), el("span", { text: percent(job.progress) }));
  if (job.progress_estimate !== null && job.progress_estimate !== undefined) {
    const estimate = bar(job.progress_estimate, "estimate");
    estimate.title = "estimated from how long recent jobs took";
    return el("div", { class: "progress" }, estimate, el("span", { class: "estimated", text: `~${percent(job.progress_estimate)}` }));
  }
  return el("div", { class: "progress" }, el("progress", { "aria-label": "starting" }), el("span", { text: "started" }));
}

function bar(value, kind) {
  return el("progress", { max: "1", value: String(value), class: kind || null });
}

function drawDaemon(daemon) {
  const pill = $("daemon");
  if (daemon.running) {
    const beat = daemon.heartbeat_age_s;
    pill.textContent = `running · PID ${daemon.pid}` + (beat !== null ? ` · heartbeat ${Math.round(beat)} s ago` : "");
    pill.className = beat !== null && beat > 15 ? "pill warn" : "pill ok";
  } else {
    pill.textContent = "not running";
    pill.className = "pill bad";
  }
}

function drawSummary(report) {
  const counts = report.counts;
  $("n-running").textContent = counts.submitted + counts.downloading;
  $("n-waiting").textContent = counts.claimed + (counts.queued || 0) + counts.submitting;
  $("n-done").textContent = counts.done;
  $("n-failed").textContent = counts.failed;
  const budget = report.budget;
  const barNode = $("budget-bar");
  if (budget.daily > 0) {
    $("spent").textContent = `${units(budget.spent_today)} of ${units(budget.daily)}`;
    barNode.hidden = false;
    barNode.value = Math.min(1, budget.spent_today / budget.daily);
    barNode.className = budget.spent_today >= budget.daily * 0.9 ? "high" : "";
  } else {
    $("spent").textContent = units(budget.spent_today);
    barNode.hidden = true;
  }
  const note = budget.resumes_at ? `paused until ${new Date(budget.resumes_at).toLocaleString()}` : budget.daily > 0 ? "creative units" : "creative units, no daily cap";
  $("budget-note").textContent = note;
}

function jobTitle(job) {
  return el("div", { class: "job-title" }, el("strong", { text: job.name }), job.preset ? el("span", { class: "tag", text: job.preset }) : null);
}

function drawJobs(jobs) {
  const running = jobs.filter((job) => job.state === "submitted" || job.state === "downloading");
  const waiting = jobs.filter((job) => ["claimed", "queued", "submitting"].includes(job.state));
  $("running").replaceChildren(
    ...running.map((job) =>
      el(
        "li",
        { class: "job", "data-id": String(job.id) },
        jobTitle(job),
        job.prompt ? el("p", { class: "prompt", text: job.prompt }) : null,
        progressOf(job),
        el("p", { class: "meta", text: `${job.job_id || ""} · ${duration(job.age_s)} since it arrived` }),
      ),
    ),
  );
  $("waiting").replaceChildren(
    ...waiting.map((job) =>
      el(
        "li",
        { class: "job", "data-id": String(job.id) },
        jobTitle(job),
        el("p", { class: "why", text: job.waiting_for ? `waiting for ${job.waiting_for}` : job.state === "submitting" ? "being sent" : job.state === "queued" ? "waiting for a free slot" : "being checked" }),
        el("p", { class: "meta", text: `${duration(job.age_s)} since it arrived` }),
      ),
    ),
  );
  $("running-empty").hidden = running.length > 0;
  $("waiting-empty").hidden = waiting.length > 0;
  document.title = running.length ? `(${running.length}) scenario-watch` : "scenario-watch";
}

function pictures(item, kind, count) {
  const nodes = [];
  for (let n = 1; n <= count; n += 1) {
    const full = kind === "reference" ? `/reference/${item.id}/${n}` : `/picture/${item.id}/${n}`;
    const thumb = kind === "reference" ? `/reference-thumb/${item.id}/${n}` : `/thumb/${item.id}/${n}`;
    const img = el("img", { src: thumb, alt: `${kind} ${n} of ${item.name}`, loading: "lazy", width: "128", height: "128" });
    img.addEventListener("error", () => img.closest("a").classList.add("missing"), { once: true });
    nodes.push(el("a", { href: full, class: `thumb ${kind}`, target: "_blank", rel: "noopener" }, img));
  }
  return nodes;
}

function drawRecent(recent) {
  const key = JSON.stringify(recent.map((item) => [item.id, item.state, item.at, item.outputs]));
  if (key !== recentKey) {
    recentKey = key;
    clocks.length = 0;
    $("recent").replaceChildren(...recent.map(card));
  }
  for (const [node, iso] of clocks) node.textContent = ago(iso);
  $("recent-empty").hidden = recent.length > 0;
}

function card(item) {
  const when = el("time", { datetime: item.at, title: item.at, text: ago(item.at) });
  clocks.push([when, item.at]);
  const head = el("div", { class: "card-head" }, el("span", { class: `badge ${item.state}`, text: item.state }), el("strong", { text: item.name }), item.preset ? el("span", { class: "tag", text: item.preset }) : null, when);
  const body = el("article", { class: `card ${item.state}`, "data-id": String(item.id) }, head);
  if (item.prompt) body.append(el("p", { class: "prompt", text: item.prompt }));
  const refs = pictures(item, "reference", item.references || 0);
  const outs = pictures(item, "output", item.outputs || 0);
  if (refs.length || outs.length) {
    const row = el("div", { class: "pictures" });
    if (refs.length) row.append(el("div", { class: "group" }, el("span", { class: "label", text: "reference" }), el("div", { class: "thumbs" }, ...refs)));
    if (refs.length && outs.length) row.append(el("span", { class: "arrow", "aria-hidden": "true", text: "→" }));
    if (outs.length) row.append(el("div", { class: "group" }, el("span", { class: "label", text: "result" }), el("div", { class: "thumbs" }, ...outs)));
    body.append(row);
  }
  if (item.state === "failed") {
    body.append(el("p", { class: "error", text: (item.stage ? `${item.stage}: ` : "") + (item.error || "failed") }));
    if (item.hint) body.append(el("p", { class: "hint", text: `hint: ${item.hint}` }));
  }
  return body;
}

function banner(text) {
  const node = $("banner");
  node.hidden = !text;
  node.textContent = text || "";
}

async function poll() {
  try {
    const response = await fetch("/status.json", { cache: "no-store", credentials: "same-origin" });
    if (response.status === 401) {
      banner("Not logged in: open /login?token=… with the daemon's [http] token once.");
    } else if (!response.ok) {
      banner(`The daemon answered HTTP ${response.status}; trying again.`);
    } else {
      const report = await response.json();
      banner("");
      drawDaemon(report.daemon);
      drawSummary(report);
      drawJobs(report.jobs);
      drawRecent(report.recent);
      $("updated").textContent = ` · updated ${new Date().toLocaleTimeString()}`;
    }
  } catch (error) {
    banner("No answer from the daemon; trying again.");
  }
  setTimeout(poll, POLL_MS);
}

poll();
