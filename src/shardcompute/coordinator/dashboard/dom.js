// Building elements without innerHTML: every string from the server or the model goes in as
// text (textContent) or as an attribute value, never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

/** An element: `props.text` becomes its text, `props.class` its class, `props.data` its
 *  data-* attributes, any other prop an attribute; `children` are appended. */
export function el(tag, props = {}, children = []) {
  return build(document.createElement(tag), props, children);
}

/** The same, in the SVG namespace. */
export function svg(tag, props = {}, children = []) {
  return build(document.createElementNS(SVG_NS, tag), props, children);
}

function build(node, props, children) {
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.setAttribute("class", value);
    else if (name === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

/** Replace every child of `node` with `children`. */
export function fill(node, children) {
  node.replaceChildren(...children.filter(Boolean));
}

/** Bytes as "1.5 GiB". */
export function formatBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(Math.floor(Math.log2(n) / 10), units.length - 1);
  const v = n / 2 ** (10 * i);
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

/** Seconds as "850 ms" or "1.25 s". */
export function formatSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s === 0) return "0";
  return s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms` : `${s.toFixed(2)} s`;
}

/** A count with thousands separators. */
export function formatCount(n) {
  return Number(n).toLocaleString("en-US");
}
