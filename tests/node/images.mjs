// The official OpenAI Node SDK against the gateway: a streamed generation and an edit.
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

try {
  await client.images.generate({ model: "gpt-image-1", prompt: "" });
} catch (error) {
  console.log(JSON.stringify({ error: { status: error.status, code: error.code, param: error.param } }));
}
