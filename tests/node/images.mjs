// The official OpenAI Node SDK against the gateway: a streamed generation, an edit, a gpt-image-2.5
// generation at a free size, and an error.
// Usage: node images.mjs <base_url> <api_key>; prints one JSON line per result.
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const events = [];
const stream = await client.images.generate({
  model: "gpt-image-1",
  prompt: "a lighthouse at dawn",
  stream: true,
  partial_images: 2,
});
for await (const event of stream) {
  events.push({ type: event.type, index: event.partial_image_index ?? null, bytes: event.b64_json.length });
}
console.log(JSON.stringify({ stream: events }));

// A 1x1 PNG, as the SDK would upload a file from disk.
const png = Buffer.from(
  "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==",
  "base64",
);
const edited = await client.images.edit({
  model: "gpt-image-1",
  image: [await toFile(png, "a.png", { type: "image/png" }), await toFile(png, "b.png", { type: "image/png" })],
  prompt: "make it blue",
});
console.log(JSON.stringify({ edit: edited.data.length, usage: edited.usage?.total_tokens ?? null }));

// Today's API: a 2.5 model at a free size (WIDTHxHEIGHT, multiples of 16) and its xhigh quality.
const free = await client.images.generate({
  model: "gpt-image-2.5-flare",
  prompt: "a panorama of a harbour",
  size: "1536x864",
  quality: "xhigh",
  complexity: "high",
});
const head = Buffer.from(free.data[0].b64_json, "base64");
console.log(
  JSON.stringify({
    free: { size: free.size, quality: free.quality, width: head.readUInt32BE(16), height: head.readUInt32BE(20) },
  }),
);

try {
  await client.images.generate({ model: "gpt-image-1", prompt: "" });
} catch (error) {
  console.log(JSON.stringify({ error: { status: error.status, code: error.code, param: error.param } }));
}
