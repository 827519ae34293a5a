// The official OpenAI Node SDK runs the batch guide against the gateway: files.create, batches.create,
// batches.retrieve until the batch ends, files.content of the output and error files.
// Usage: node batch.mjs <base_url> <api_key> generations <lines>
//        node batch.mjs <base_url> <api_key> edits <lines>
// Prints one JSON line: the final batch, and the output and error files' lines in brief.
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey, mode, count] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const total = Number(count);

// A 1x1 RGBA PNG: an image to edit and, being RGBA, its mask.
const png = Buffer.from(
  "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==",
  "base64",
);
const MODELS = [
  ["gpt-image-1", "1024x1024"],
  ["gpt-image-1-mini", "1536x1024"],
  ["dall-e-3", "1024x1792"],
];

async function generationLines() {
  const lines = [];
  for (let i = 0; i < total; i++) {
    const [model, size] = MODELS[i % 3];
    const n = model !== "dall-e-3" && i % 5 === 0 ? 2 : 1;
    const response_format = i % 4 === 0 ? "url" : "b64_json";
    lines.push({
      custom_id: `gen-${i}`,
      method: "POST",
      url: "/v1/images/generations",
      body: { model, prompt: `product shot ${i}`, size, n, response_format },
    });
  }
  const invalid = {
    "gen-bad-size": { model: "gpt-image-1", prompt: "x", size: "3x3" },
    "gen-no-prompt": { model: "gpt-image-1" },
    "gen-blocked": { model: "gpt-image-1", prompt: "a dismembered corpse" },
  };
  for (const [custom_id, body] of Object.entries(invalid)) {
    lines.push({ custom_id, method: "POST", url: "/v1/images/generations", body });
  }
  return lines;
}

async function editLines() {
  const shot = await client.files.create({ file: await toFile(png, "shot.png", { type: "image/png" }), purpose: "vision" });
  const lines = [];
  for (let i = 0; i < total; i++) {
    const body = {
      model: "gpt-image-1",
      prompt: `on a white table ${i}`,
      images: Array(i % 2 ? 2 : 1).fill({ file_id: shot.id }),
      size: "1024x1024",
    };
    if (i % 5 === 0) body.mask = { file_id: shot.id };
    lines.push({ custom_id: `edit-${i}`, method: "POST", url: "/v1/images/edits", body });
  }
  // An image by URL: the gateway never fetches a URL a client typed, so this line fails alone.
  lines.push({
    custom_id: "by-url",
    method: "POST",
    url: "/v1/images/edits",
    body: { model: "gpt-image-1", prompt: "x", images: [{ image_url: "http://10.0.0.1/a.png" }] },
  });
  return lines;
}

const lines = mode === "edits" ? await editLines() : await generationLines();
const jsonl = Buffer.from(lines.map((line) => JSON.stringify(line)).join("\n") + "\n");
const input = await client.files.create({ file: await toFile(jsonl, "batch.jsonl"), purpose: "batch" });
let batch = await client.batches.create({
  input_file_id: input.id,
  endpoint: mode === "edits" ? "/v1/images/edits" : "/v1/images/generations",
  completion_window: "24h",
  metadata: { sdk: "node" },
});
const ENDED = new Set(["completed", "failed", "expired", "cancelled"]);
const statuses = [batch.status];
for (let polls = 0; !ENDED.has(batch.status); polls++) {
  if (polls > 2400) throw new Error(`batch still ${batch.status}`);
  await new Promise((resolve) => setTimeout(resolve, 100));
  batch = await client.batches.retrieve(batch.id);
  if (statuses.at(-1) !== batch.status) statuses.push(batch.status);
}

async function read(fileId) {
  if (!fileId) return [];
  const text = await (await client.files.content(fileId)).text();
  return text
    .split("\n")
    .filter((line) => line.trim())
    .map((line) => JSON.parse(line));
}

function brief(line) {
  const body = line.response?.body ?? {};
  const data = body.data ?? [];
  return {
    custom_id: line.custom_id,
    status: line.response?.status_code ?? null,
    n: data.length,
    kind: data.length ? (data[0].url ? "url" : data[0].b64_json ? "b64_json" : null) : null,
    png: data.length && data[0].b64_json ? Buffer.from(data[0].b64_json, "base64").subarray(1, 4).toString() : null,
    url: data.length ? (data[0].url ?? null) : null,
    code: body.error?.code ?? null,
    param: body.error?.param ?? null,
  };
}

const outputs = (await read(batch.output_file_id)).map(brief);
const errors = (await read(batch.error_file_id)).map(brief);
console.log(
  JSON.stringify({
    id: batch.id,
    status: batch.status,
    statuses,
    counts: batch.request_counts,
    metadata: batch.metadata,
    timestamps: [batch.created_at, batch.in_progress_at, batch.finalizing_at, batch.completed_at],
    outputs,
    errors,
  }),
);
