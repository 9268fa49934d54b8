// Line charts drawn as SVG: up to the last HORIZON seconds of traffic samples, ending at
// "now" (the newest sample's time, so the server's clock, not the browser's, sets the axis).
// A younger history spans what there is, at least MIN_SPAN.

import { el, fill, svg } from "./dom.js";

export const HORIZON = 15 * 60;
const MIN_SPAN = 60;
const TICK_STEPS = [15, 30, 60, 120, 300];
const W = 400, H = 130;
const PAD = { left: 44, right: 8, top: 8, bottom: 18 };
const PLOT_W = W - PAD.left - PAD.right, PLOT_H = H - PAD.top - PAD.bottom;

/** One chart: `series` is [{key, label}], read from each sample as sample[key]. */
export class LineChart {
  constructor(container, { id, title, series, format }) {
    this.series = series;
    this.format = format;
    this.svg = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    this.legend = el("div", { class: "legend" });
    container.append(el("div", { class: "chart", data: { chart: id } }, [
      el("h3", { text: title }), this.svg, this.legend,
    ]));
  }

  /** Redraw from `samples` (oldest first), given the sampling interval in seconds. */
  update(samples, interval) {
    const now = samples.length ? samples[samples.length - 1].t : 0;
    const visible = samples.filter((s) => s.t >= now - HORIZON);
    const span = Math.min(HORIZON, Math.max(MIN_SPAN, now - (visible[0]?.t ?? now)));
    const top = niceCeiling(Math.max(0, ...this.values(visible)));
    const x = (t) => PAD.left + ((t - (now - span)) / span) * PLOT_W;
    const y = (v) => PAD.top + PLOT_H - (v / top) * PLOT_H;
    const paths = this.series.map((s, i) => {
      const values = visible.map((p) => p[s.key]).filter((v) => v !== null && v !== undefined);
      return svg("path", {
        class: `series series-${i}`,
        d: linePath(visible, s.key, x, y, interval * 3),
        data: { series: s.key, points: values.length, max: Math.max(0, ...values) },
      });
    });
    fill(this.svg, [...valueAxis(top, y, this.format), ...timeAxis(span), ...paths]);
    const last = visible[visible.length - 1];
    fill(this.legend, this.series.map((s, i) => el("span", {}, [
      el("span", { class: `swatch series-${i}` }),
      el("span", { text: `${s.label} ${last ? this.format(last[s.key]) : "–"}` }),
    ])));
  }

  values(samples) {
    return samples.flatMap((p) => this.series.map((s) => p[s.key] ?? 0));
  }
}

/** An SVG path through the points with a value; a missing value or a gap in time breaks it. */
function linePath(samples, key, x, y, maxGap) {
  let d = "", prevT = null;
  for (const p of samples) {
    const v = p[key];
    if (v === null || v === undefined) { prevT = null; continue; }
    const point = `${x(p.t).toFixed(1)},${y(v).toFixed(1)}`;
    // A zero-length segment after each move, so a lone point shows as a dot (round caps).
    d += prevT === null || p.t - prevT > maxGap ? `M${point} l0,0 ` : `L${point} `;
    prevT = p.t;
  }
  return d.trim() || "M0,0";
}

function valueAxis(top, y, format) {
  const parts = [];
  for (const v of [0, top / 2, top]) {
    parts.push(svg("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    parts.push(svg("text", { class: "axis", x: PAD.left - 4, y: y(v) + 3, "text-anchor": "end", text: format(v) }));
  }
  return parts;
}

/** Labels under the plot: "now" at the right, then every step back, at most 4 more. */
function timeAxis(span) {
  const step = TICK_STEPS.find((s) => span / s <= 4) ?? 300;
  const parts = [];
  for (let ago = 0; ago <= span + 0.001; ago += step) {
    const label = ago === 0 ? "now" : ago < 60 ? `-${ago} s` : `-${ago / 60} min`;
    const anchor = ago === 0 ? "end" : "middle";
    const xPos = PAD.left + (1 - ago / span) * PLOT_W;
    parts.push(svg("text", { class: "axis", x: xPos, y: H - 4, "text-anchor": anchor, text: label }));
  }
  return parts;
}

/** The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `v` (1 for 0). */
function niceCeiling(v) {
  if (!(v > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= v) return m * power;
  return 10 * power;
}
