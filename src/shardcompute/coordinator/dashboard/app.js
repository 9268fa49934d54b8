// The dashboard: reads the coordinator's live stream (/dashboard/events) and draws the
// cluster, the plan and the traffic; asks for the API key when the server wants one.

import { apiFetch, apiKey, readEvents, Unauthorized } from "./api.js";
import { HORIZON, LineChart } from "./charts.js";
import { Chat } from "./chat.js";
import { renderCluster } from "./cluster.js";
import { formatSeconds } from "./dom.js";

const $ = (id) => document.getElementById(id);
const RETRY_MS = 2000;

const state = { view: null, samples: [], interval: 1, stream: null };

// Counts and rates: "3", "1.25", "42.5" (at most two decimals, fewer as values grow).
const count = (v) => (v === null || v === undefined ? "–" : String(+v.toFixed(v < 10 ? 2 : 1)));
const charts = [
  ["throughput", "Throughput (tok/s, all requests)", [["tokens_per_second", "tok/s"]], count],
  ["ttft", "Time to first token", [["ttft_p50", "p50"], ["ttft_p90", "p90"]], formatSeconds],
  ["itl", "Inter-token latency", [["itl_p50", "p50"], ["itl_p90", "p90"]], formatSeconds],
  ["batch", "Queue and running batch", [["queue_depth", "queued"], ["running", "running"]], count],
].map(([id, title, series, format]) => new LineChart($("charts"), {
  id, title, format, series: series.map(([key, label]) => ({ key, label })),
}));

function onTraffic(history) {
  state.interval = history.interval_seconds;
  state.samples.push(...history.samples);
  const newest = state.samples.length ? state.samples[state.samples.length - 1].t : 0;
  const firstKept = state.samples.findIndex((s) => s.t >= newest - HORIZON);
  if (firstKept > 0) state.samples.splice(0, firstKept);
  for (const chart of charts) chart.update(state.samples, state.interval);
}

function onCluster(view) {
  state.view = view;
  renderCluster(view);
}

/** Read the live stream until it ends; reconnect after a pause unless the key is refused. */
async function connect() {
  state.stream?.abort();
  const controller = (state.stream = new AbortController());
  state.samples = [];
  for (;;) {
    try {
      const response = await apiFetch("/dashboard/events", { signal: controller.signal });
      setConnection("live");
      delete document.body.dataset.stale;
      for await (const { event, data } of readEvents(response)) {
        if (event === "traffic") onTraffic(JSON.parse(data));
        else if (event === "cluster") onCluster(JSON.parse(data));
      }
    } catch (e) {
      if (controller.signal.aborted) return;
      if (e instanceof Unauthorized) return askForKey(e.message);
    }
    setConnection("connection lost; reconnecting");
    markStale();
    state.samples = [];
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

function setConnection(text) {
  $("connection").textContent = text;
}

// Without the stream nothing on the page is current: say so rather than show stale health.
function markStale() {
  document.body.dataset.stale = "true";
  const badge = $("cluster-state");
  badge.textContent = "unreachable";
  badge.dataset.state = "degraded";
}

function askForKey(message) {
  state.stream?.abort();
  setConnection("needs an API key");
  $("auth").hidden = false;
  $("auth-message").textContent = apiKey.get() ? message : "";
  $("api-key").focus();
}

$("auth-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey.set($("api-key").value.trim());
  $("api-key").value = "";
  $("auth").hidden = true;
  connect();
});

// The chat names the model the cluster serves; before the first view, the API says.
let servedModel = null;
async function modelName() {
  if (state.view) return state.view.model;
  servedModel ??= (await (await apiFetch("/v1/models")).json()).data[0].id;
  return servedModel;
}

new Chat({ model: modelName, onUnauthorized: askForKey });
connect();
