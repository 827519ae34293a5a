// Generate, stream and edit with the official SDK from a page on another origin
// (tests/browser/test_sdk_cors.py calls window.runSdk and checks what it returns).
import OpenAI, { toFile } from "openai";

async function png(colour) {
  const canvas = new OffscreenCanvas(64, 64);
  const context = canvas.getContext("2d");
  context.fillStyle = colour;
  context.fillRect(0, 0, 64, 64);
  const blob = await canvas.convertToBlob({ type: "image/png" });
  return toFile(blob, "input.png", { type: "image/png" });
}

window.runSdk = async (baseURL, apiKey) => {
  const client = new OpenAI({
    baseURL,
    apiKey,
    dangerouslyAllowBrowser: true,
    organization: "org-browser",
    project: "proj-browser",
    maxRetries: 0,
    timeout: 60_000,
  });
  const generated = await client.images
    .generate({ model: "gpt-image-1.5", prompt: "a lighthouse", size: "1024x1024" })
    .withResponse();
  const streamed = [];
  const stream = await client.images.generate({
    model: "gpt-image-1.5",
    prompt: "a harbour",
    size: "1024x1024",
    stream: true,
    partial_images: 1,
  });
  for await (const event of stream) streamed.push(event.type);
  const edited = await client.images
    .edit({ model: "gpt-image-1.5", prompt: "make it blue", image: await png("#c02020") })
    .withResponse();
  let refused = null;
  try {
    await client.images.generate({ model: "gpt-image-1.5", prompt: "" });
  } catch (error) {
    refused = { status: error.status, code: error.code, requestId: error.requestID ?? null };
  }
  return {
    generated: {
      images: generated.data.data.length,
      b64: (generated.data.data[0].b64_json ?? "").length,
      cost: generated.response.headers.get("x-gateway-cost"),
      requestId: generated.response.headers.get("x-request-id"),
    },
    streamed,
    edited: { images: edited.data.data.length, cost: edited.response.headers.get("x-gateway-cost") },
    refused,
  };
};
document.getElementById("status").textContent = "ready";
