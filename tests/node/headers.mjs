// Prints, as JSON, the request headers the official SDK sends for an image generation, a streamed
// generation and an edit (argv[2]: a base URL that records headers; tests/contract/test_cors.py).
import OpenAI, { toFile } from "openai";

const client = new OpenAI({
  baseURL: process.argv[2],
  apiKey: "sk-test",
  organization: "org-test",
  project: "proj-test",
  maxRetries: 0,
  timeout: 60_000,
});
await client.images.generate({ model: "gpt-image-1.5", prompt: "x" }, { timeout: 60_000 }).catch(() => {});
await client.images.generate({ model: "gpt-image-1.5", prompt: "x", stream: true }).catch(() => {});
const png = await toFile(Buffer.from([137, 80, 78, 71]), "a.png", { type: "image/png" });
await client.images.edit({ model: "gpt-image-1.5", prompt: "x", image: png }).catch(() => {});
console.log("done");
