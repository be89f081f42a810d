// The web export's classifier: ONNX Runtime Web on the folder's model, the preparation of prepare.mjs, and the
// machine interface window.toolkitClassify(url) -> Promise<{label, scores, input}>. Nothing is fetched from
// outside this folder.
import * as ort from "./ort.webgpu.min.mjs";
import { modelPixels, toInput } from "./prepare.mjs";

const here = new URL("./", import.meta.url).href;
ort.env.wasm.wasmPaths = here;
// several threads need cross-origin isolation (a server sending COOP/COEP headers); else one
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(2, navigator.hardwareConcurrency || 1) : 1;

async function webgpu() {
  try {
    return Boolean(navigator.gpu && (await navigator.gpu.requestAdapter()));
  } catch {
    return false;
  }
}

export async function load() {
  const spec = await (await fetch(new URL("model.json", here))).json();
  const order = (await webgpu()) ? ["webgpu", "wasm"] : ["wasm"];
  let session = null, backend = null, failed = null;
  for (const provider of order) {
    try {
      session = await ort.InferenceSession.create(new URL(spec.model, here).href, { executionProviders: [provider] });
      backend = provider;
      break;
    } catch (e) {
      failed = e;
    }
  }
  if (!session) throw failed;
  return { spec, session, backend, threads: backend === "wasm" ? ort.env.wasm.numThreads : null, queue: Promise.resolve() };
}

// one run at a time per session
function serial(model, work) {
  const next = model.queue.then(work, work);
  model.queue = next.catch(() => {});
  return next;
}

// input: Float32Array or Uint8Array of batch x C x H x W -> Float32Array of batch x classes
export function run(model, input, batch) {
  const { spec, session } = model;
  return serial(model, async () => {
    const tensor = new ort.Tensor(spec.input.dtype === "uint8" ? "uint8" : "float32", input, [batch, ...spec.input.chw]);
    const out = await session.run({ [spec.input.name]: tensor });
    return Float32Array.from(out[spec.output.name].data);
  });
}

// a Blob (an image file) -> {width, height, channels: 4, data}: the browser decodes it, EXIF orientation applied
export async function decode(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  bitmap.close();
  return { width: canvas.width, height: canvas.height, channels: 4, data: new Uint8Array(data.buffer) };
}

export function softmax(logits) {
  const top = Math.max(...logits);
  const e = Array.from(logits, (v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

// RGBA pixels -> {label, index, scores (softmax), logits, pixels (what the model sees), input}
export async function classifyPixels(model, rgba) {
  const pixels = modelPixels(rgba, model.spec);
  const input = toInput(pixels, model.spec);
  const logits = await run(model, input, 1);
  const scores = softmax(logits);
  const index = scores.indexOf(Math.max(...scores));
  return { label: model.spec.classes[index], index, scores, logits: Array.from(logits), pixels, input };
}

export async function classifyBlob(model, blob) {
  return classifyPixels(model, await decode(blob));
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

// For machines (tests, `toolkit verify`): set up once the page has loaded its model
export function expose(model) {
  window.toolkitModel = model;
  window.toolkitClassifyBlob = (blob) => classifyBlob(model, blob);
  window.toolkitClassify = async (url) => {
    const found = await classifyBlob(model, await (await fetch(url)).blob());
    return { label: found.label, scores: found.scores, input: Array.from(found.input) };
  };
  // a batch of model inputs (base64 of float32 or uint8, NCHW) -> base64 of float32 logits
  window.toolkitRunTensor = async (b64, batch) => {
    const bytes = fromBase64(b64);
    const input = model.spec.input.dtype === "uint8" ? bytes : new Float32Array(bytes.buffer);
    return toBase64(new Uint8Array((await run(model, input, batch)).buffer));
  };
  // bench: calls of one batch timed inside the page until both minIters and minMs are reached -> microseconds per call
  window.toolkitTime = async (b64, batch, warmup, minIters, minMs, maxIters) => {
    const bytes = fromBase64(b64);
    const input = model.spec.input.dtype === "uint8" ? bytes : new Float32Array(bytes.buffer);
    for (let i = 0; i < warmup; i++) await run(model, input, batch);
    const times = [];
    const start = performance.now();
    while (times.length < maxIters && (times.length < minIters || performance.now() - start < minMs)) {
      const t0 = performance.now();
      await run(model, input, batch);
      times.push((performance.now() - t0) * 1000);
    }
    return times;
  };
  // image files (base64) through the page's own decoding and preparation -> base64 of their logits and inputs
  window.toolkitRunFiles = async (files) => {
    const logits = [], inputs = [], failed = [];
    for (const [i, b64] of files.entries()) {
      try {
        const found = await classifyBlob(model, new Blob([fromBase64(b64)]));
        logits.push(...found.logits);
        inputs.push(...found.pixels.data);
      } catch (e) {
        failed.push([i, String(e.message)]);
        logits.push(...new Array(model.spec.classes.length).fill(0));
        inputs.push(...new Array(model.spec.input.chw.reduce((a, b) => a * b, 1)).fill(0));
      }
    }
    return { logits: toBase64(new Uint8Array(Float32Array.from(logits).buffer)), pixels: toBase64(Uint8Array.from(inputs)), failed };
  };
}
