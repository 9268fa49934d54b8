// The cluster as the coordinator's ClusterView describes it: the header, one card per
// worker, and the partition plan drawn as bars sized by each rank's share.

import { el, fill, formatBytes, formatCount } from "./dom.js";

const $ = (id) => document.getElementById(id);

// Split dimensions of PartitionPlan.to_dict(), in the order a layer uses them.
const PLAN_DIMENSIONS = [
  ["heads", "query heads"],
  ["kv_heads", "KV heads"],
  ["intermediate", "MLP columns"],
  ["vocab", "vocabulary"],
  ["hidden", "embedding columns"],
];

/** Show everything a ClusterView holds. */
export function renderCluster(view) {
  renderHeader(view);
  fill($("workers"), view.workers.map((w) => workerCard(w, view.heartbeat_timeout_seconds)));
  renderPlan(view.plan, view.plan_weights);
  renderCollectives(view);
}

function renderHeader(view) {
  const badge = $("cluster-state");
  badge.textContent = view.state;
  badge.dataset.state = view.state;
  const alive = view.workers.filter((w) => w.alive).length;
  $("cluster-model").textContent =
    `${view.model} · ${view.dtype} · ${view.backend} · ${alive}/${view.world_size} workers` +
    ` · generation ${view.generation}`;
  $("cluster-reason").textContent = view.reason;
}

/** What a worker is doing, in one word; also its card's colour. */
export function workerState(w) {
  if (!w.alive) return "dead";
  if (w.engine_state === "exited") return "exited";
  if (w.loaded) return "ready";
  if (w.rank === null) return "idle";
  return w.engine_state === "running" ? "loading" : "starting";
}

function workerCard(w, timeout) {
  const state = workerState(w);
  const f = w.facts, m = w.metrics;
  const used = m.memory_bytes, total = f.memory_bytes;
  const rows = [
    ["device", [f.cpu || f.machine || "unknown CPU", `${f.cpu_count} cores`, f.mlx_device].join(" · ")],
    ["memory", `${formatBytes(used)} of ${formatBytes(total)} (peak ${formatBytes(m.peak_memory_bytes)})`, meter(used, total)],
    ["heartbeat", `${w.seconds_since_heartbeat.toFixed(1)} s ago` + (timeout ? ` (dead after ${timeout} s)` : "")],
    ["engine", `${w.engine_state}, ${w.engine_restarts} restart${w.engine_restarts === 1 ? "" : "s"}`],
    ["work", `${formatCount(m.tokens_processed)} tokens, ${formatCount(m.steps)} steps`],
    ["address", w.address],
  ];
  if (m.kv_tokens_total > 0) {
    rows.splice(2, 0, ["KV cache", `${formatCount(m.kv_tokens_used)} of ${formatCount(m.kv_tokens_total)} tokens`, meter(m.kv_tokens_used, m.kv_tokens_total)]);
  }
  return el("article", { class: "card", data: { workerId: w.worker_id, rank: w.rank ?? "", state } }, [
    el("h3", {}, [
      el("span", { text: f.host }),
      el("span", { class: "muted", text: w.rank === null ? "spare" : `rank ${w.rank}` }),
      el("span", { class: "badge state", data: { state }, text: state }),
    ]),
    el("dl", {}, rows.flatMap(([k, v, extra]) => [el("dt", { text: k }), el("dd", { text: v }, [extra])])),
  ]);
}

function meter(used, total) {
  const bar = el("div");
  bar.style.width = `${total ? Math.min(100, (100 * used) / total) : 0}%`;
  return el("div", { class: "meter" }, [bar]);
}

function renderPlan(plan, weights) {
  const summary = $("plan-summary");
  if (!plan || !Array.isArray(plan.ranks)) {
    summary.textContent = "waiting for the engines to report their plan";
    fill($("plan"), []);
    return;
  }
  const w = plan.weights || weights || [];
  const even = w.every((x) => x === w[0]);
  summary.textContent = `${plan.world_size} ranks, ` +
    (even ? "even weights" : `weights ${w.join(" : ")}`) + "; each bar is one rank's share";
  fill($("plan"), PLAN_DIMENSIONS.map(([key, label]) => planRow(plan.ranks, key, label)));
}

function planRow(ranks, key, label) {
  const sizes = ranks.map((r) => (Array.isArray(r[key]) ? r[key][1] - r[key][0] : 0));
  const total = sizes.reduce((a, b) => a + b, 0);
  const segments = ranks.map((r, i) => {
    const seg = el("div", {
      class: `segment rank-${i % 8}`,
      data: { rank: r.rank ?? i, size: sizes[i] },
      title: `rank ${r.rank ?? i}: ${label} [${r[key]?.[0]}, ${r[key]?.[1]}) = ${sizes[i]} of ${total}`,
      text: `r${r.rank ?? i}: ${formatCount(sizes[i])}`,
    });
    seg.style.flexGrow = String(sizes[i]);
    return seg;
  });
  return el("div", { class: "plan-row", data: { dimension: key } }, [
    el("span", { class: "plan-label", text: `${label} (${formatCount(total)})` }),
    el("div", { class: "bar" }, segments),
  ]);
}

function renderCollectives(view) {
  const box = $("collectives");
  if (view.collectives_per_token === null || view.collectives_per_token === undefined) {
    fill(box, []);
    return;
  }
  const ranked = view.workers.filter((w) => w.rank !== null).sort((a, b) => a.rank - b.rank);
  const measured = ranked.some((w) => w.metrics.profiled_steps > 0);
  const rows = ranked.map((w) => {
    const m = w.metrics;
    const n = m.profiled_steps;
    const perStep = n ? (1000 * m.collective_seconds) / n : 0;
    const share = m.profiled_step_seconds ? (100 * m.collective_seconds) / m.profiled_step_seconds : 0;
    return el("tr", {}, [
      el("td", { text: `rank ${w.rank}` }),
      el("td", { text: n ? `${perStep.toFixed(2)} ms` : "–" }),
      el("td", { text: n ? `${share.toFixed(0)}%` : "–" }),
      el("td", { text: `${n}` }),
    ]);
  });
  const heads = ["rank", "in collectives per decode step", "share of the step", "steps sampled"];
  fill(box, [
    el("div", { text: `${view.collectives_per_token} collectives per token (an all-reduce after attention and after the MLP of each layer, all-gathers for the embedding and the LM head)` }),
    measured
      ? el("table", {}, [el("tr", {}, heads.map((h) => el("th", { text: h }))), ...rows])
      : el("div", { class: "muted", text: "time in collectives: sampled once every 100 decode steps at world size 2 or more; none sampled yet" }),
  ]);
}
