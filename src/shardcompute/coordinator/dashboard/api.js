// Requests to the coordinator, with the API key when the page has one, and server-sent
// events read from a fetch (EventSource cannot send an Authorization header).

const KEY_NAME = "shardcompute.apiKey";

/** The API key of this browser tab (sessionStorage: it dies with the tab), or null. */
export const apiKey = {
  get: () => sessionStorage.getItem(KEY_NAME),
  set: (key) => sessionStorage.setItem(KEY_NAME, key),
  clear: () => sessionStorage.removeItem(KEY_NAME),
};

/** The server refused the key (or its absence): the page should ask for one. */
export class Unauthorized extends Error {}

/** The `error.message` of an OpenAI-style error body, or the HTTP status. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/** fetch() with the API key; throws Unauthorized on 401, Error with the server's message on
 *  any other failure status. */
export async function apiFetch(path, options = {}) {
  const key = apiKey.get();
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized(await errorMessage(response));
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

/** Yields {event, data} for each server-sent event of a streaming response body. */
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const parsed = parseBlock(block);
      if (parsed) yield parsed;
    }
  }
}

function parseBlock(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { event, data: data.join("\n") } : null;
}
