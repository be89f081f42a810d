// The toolkit's one preparation path (toolkit.inference.preprocess) in JavaScript, for the web export's page:
// an image's RGBA pixels -> the model's uint8 pixels -> its normalized input. Written to give Python's bytes:
// Pillow's resampling in fixed point (ImagingResample, 8 bits per channel), Pillow's grey conversion, NumPy's
// percentile, median and float32 arithmetic where the Python code computes in float32 (Math.fround). The image
// decoding itself is the browser's (see docs/export.md, "The web page").

const f32 = Math.fround;
const PRECISION_BITS = 32 - 8 - 2;
export const WORK_SIDE = 256;
export const MNIST_STROKE = 2.4;

// ------------------------------------------------------------------------------------------- Python's numbers

export function pyRound(x) {
  // Python's round(): halves to even
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

function lerp(a, b, t) {
  // numpy's _lerp
  const diff = b - a;
  return t >= 0.5 ? b - diff * (1 - t) : a + diff * t;
}

export function percentile(values, q) {
  // np.percentile(values, q), method "linear", in float64
  const sorted = Float64Array.from(values).sort();
  const n = sorted.length;
  const virtual = (n - 1) * (q / 100);
  const prev = Math.floor(virtual);
  const next = Math.min(prev + 1, n - 1);
  return lerp(sorted[prev], sorted[next], virtual - prev);
}

export function median(values) {
  const sorted = Float64Array.from(values).sort();
  const n = sorted.length;
  return n % 2 ? sorted[(n - 1) / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
}

// ------------------------------------------------------------------------------------------- Pillow

const FILTERS = {
  box: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) },
  lanczos: { support: 3.0, f: (x) => (x >= -3.0 && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0) },
};

function sinc(x) {
  if (x === 0.0) return 1.0;
  x = x * Math.PI;
  return Math.sin(x) / x;
}

function coefficients(inSize, in0, in1, outSize, filter) {
  // Pillow's precompute_coeffs + normalize_coeffs_8bpc
  const scale = (in1 - in0) / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const kk = new Int32Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      w[x] = filter.f((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0.0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * (1 << PRECISION_BITS)) : Math.trunc(0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { kk, bounds, ksize };
}

function clip8(ss) {
  if (ss >= 1 << PRECISION_BITS << 8) return 255;
  if (ss <= 0) return 0;
  return ss >> PRECISION_BITS;
}

// img: {width, height, channels, data: Uint8Array (interleaved)} -> the same, resized as Pillow's Image.resize
// (box: the source region [x0, y0, x1, y1], fractional as Pillow allows; the whole image by default)
export function resize(img, width, height, filterName, box = null) {
  const [x0, y0, x1, y1] = box || [0, 0, img.width, img.height];
  const needHorizontal = width !== img.width || x0 !== 0 || x1 !== width;
  const needVertical = height !== img.height || y0 !== 0 || y1 !== height;
  if (!needHorizontal && !needVertical) return { ...img, data: img.data.slice() };
  const filter = FILTERS[filterName];
  const c = img.channels;
  let cur = img;
  if (needHorizontal) {
    const { kk, bounds, ksize } = coefficients(img.width, x0, x1, width, filter);
    const out = new Uint8Array(width * img.height * c);
    for (let y = 0; y < img.height; y++) {
      for (let xx = 0; xx < width; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
        for (let ch = 0; ch < c; ch++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let x = 0; x < xmax; x++) ss += img.data[(y * img.width + x + xmin) * c + ch] * kk[xx * ksize + x];
          out[(y * width + xx) * c + ch] = clip8(ss);
        }
      }
    }
    cur = { width, height: img.height, channels: c, data: out };
  }
  if (needVertical) {
    const { kk, bounds, ksize } = coefficients(img.height, y0, y1, height, filter);
    const out = new Uint8Array(width * height * c);
    for (let yy = 0; yy < height; yy++) {
      const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
      for (let x = 0; x < width; x++) {
        for (let ch = 0; ch < c; ch++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let y = 0; y < ymax; y++) ss += cur.data[((y + ymin) * width + x) * c + ch] * kk[yy * ksize + y];
          out[(yy * width + x) * c + ch] = clip8(ss);
        }
      }
    }
    cur = { width, height, channels: c, data: out };
  }
  return cur;
}

// RGBA (as the browser decodes a file) -> RGB on white, as preprocess.on_white (Pillow's alpha_composite)
export function onWhite(rgba) {
  const n = rgba.width * rgba.height;
  const out = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    const a = rgba.data[i * 4 + 3];
    for (let ch = 0; ch < 3; ch++) {
      const v = rgba.data[i * 4 + ch];
      if (a === 255) out[i * 3 + ch] = v;
      else if (a === 0) out[i * 3 + ch] = 255;
      else {
        const tmp = v * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
        out[i * 3 + ch] = (((tmp >> 8) + tmp) >> 8) >> 7;
      }
    }
  }
  return { width: rgba.width, height: rgba.height, channels: 3, data: out };
}

// RGB -> L, Pillow's integer luma
export function grey(rgb) {
  const n = rgb.width * rgb.height;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const d = rgb.data;
    out[i] = (d[i * 3] * 19595 + d[i * 3 + 1] * 38470 + d[i * 3 + 2] * 7471 + 0x8000) >>> 16;
  }
  return { width: rgb.width, height: rgb.height, channels: 1, data: out };
}

// ------------------------------------------------------------------------------------------- arrays

function borderValues(data, w, h) {
  const out = [];
  for (let x = 0; x < w; x++) out.push(data[x]);
  for (let x = 0; x < w; x++) out.push(data[(h - 1) * w + x]);
  for (let y = 0; y < h; y++) out.push(data[y * w]);
  for (let y = 0; y < h; y++) out.push(data[y * w + w - 1]);
  return out;
}

function rank(a, w, h, size, op) {
  // preprocess._rank: a square min/max filter, edges replicated (separable)
  const r = (size - 1) / 2;
  const rows = new a.constructor(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let v = a[Math.min(h - 1, Math.max(0, y - r)) * w + x];
      for (let i = 1; i < size; i++) v = op(v, a[Math.min(h - 1, Math.max(0, y - r + i)) * w + x]);
      rows[y * w + x] = v;
    }
  }
  const out = new a.constructor(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let v = rows[y * w + Math.min(w - 1, Math.max(0, x - r))];
      for (let j = 1; j < size; j++) v = op(v, rows[y * w + Math.min(w - 1, Math.max(0, x - r + j))]);
      out[y * w + x] = v;
    }
  }
  return out;
}

const max = (a, b) => (a > b ? a : b);
const min = (a, b) => (a < b ? a : b);

function crop(a, w, top, bottom, left, right) {
  const cw = right - left, ch = bottom - top;
  const out = new a.constructor(cw * ch);
  for (let y = 0; y < ch; y++) for (let x = 0; x < cw; x++) out[y * cw + x] = a[(y + top) * w + x + left];
  return out;
}

function bbox(test, w, h) {
  let top = h, bottom = -1, left = w, right = -1;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (test(y * w + x)) {
        top = Math.min(top, y); bottom = Math.max(bottom, y); left = Math.min(left, x); right = Math.max(right, x);
      }
    }
  }
  return bottom < 0 ? null : { top, bottom: bottom + 1, left, right: right + 1 };
}

function solve(m, b) {
  // a small linear system by Gaussian elimination with partial pivoting (float64)
  const n = b.length;
  const a = m.map((row, i) => [...row, b[i]]);
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(a[r][c]) > Math.abs(a[p][c])) p = r;
    [a[c], a[p]] = [a[p], a[c]];
    for (let r = c + 1; r < n; r++) {
      const f = a[r][c] / a[c][c];
      for (let k = c; k <= n; k++) a[r][k] -= f * a[c][k];
    }
  }
  const x = new Array(n).fill(0);
  for (let r = n - 1; r >= 0; r--) {
    let s = a[r][n];
    for (let k = r + 1; k < n; k++) s -= a[r][k] * x[k];
    x[r] = s / a[r][r];
  }
  return x;
}

function linspace(n) {
  return Array.from({ length: n }, (_, i) => (n > 1 ? (i === n - 1 ? 1.0 : i * (2 / (n - 1)) + -1.0) : 0.0));
}

function terms(rows, cols) {
  const y = linspace(rows), x = linspace(cols);
  const out = [];
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out.push([1, x[j], y[i], x[j] * x[j], x[j] * y[i], y[i] * y[i]]);
  return out;
}

// ------------------------------------------------------------------------------------------- digits

function paperSurface(gray, w, h) {
  // preprocess.paper_surface: a quadratic surface fitted to the pixels that are not ink
  const scale = Math.min(1.0, 48.0 / Math.max(h, w));
  let small = { width: w, height: h, channels: 1, data: Uint8Array.from(gray, (v) => Math.trunc(Math.min(255, Math.max(0, v)))) };
  if (scale < 1.0) small = resize(small, Math.max(1, pyRound(w * scale)), Math.max(1, pyRound(h * scale)), "box");
  const a = terms(small.height, small.width);
  const v = Float64Array.from(small.data);
  const p15 = percentile(v, 15);
  let paper = Array.from(v, (x) => x <= p15);
  let coef = null;
  for (let it = 0; it < 5; it++) {
    const ata = Array.from({ length: 6 }, () => new Array(6).fill(0));
    const atb = new Array(6).fill(0);
    for (let i = 0; i < v.length; i++) {
      if (!paper[i]) continue;
      for (let r = 0; r < 6; r++) {
        atb[r] += a[i][r] * v[i];
        for (let c = 0; c < 6; c++) ata[r][c] += a[i][r] * a[i][c];
      }
    }
    coef = solve(ata, atb);
    const residual = a.map((t, i) => v[i] - t.reduce((s, tk, k) => s + tk * coef[k], 0));
    const onPaper = residual.filter((_, i) => paper[i]);
    const m = median(onPaper);
    const spread = 1.4826 * median(onPaper.map((r) => Math.abs(r - m))) + 1.0;
    paper = residual.map((r) => r < 3.0 * spread);
  }
  const full = terms(h, w);
  return Float32Array.from(full, (t) => t.reduce((s, tk, k) => s + tk * coef[k], 0));
}

function otsu(values) {
  const hist = new Float64Array(256);
  for (const v of values) hist[Math.trunc(Math.min(255, Math.max(0, v)))] += 1;
  let total = 0;
  for (const h of hist) total += h;
  if (total === 0) return 0;
  let w0 = 0, m0 = 0, best = -1, bestAt = 0, meanAll = 0;
  for (let i = 0; i < 256; i++) meanAll += hist[i] * i;
  for (let i = 0; i < 256; i++) {
    w0 += hist[i];
    m0 += hist[i] * i;
    const w1 = total - w0;
    let between = (meanAll * w0 / total - m0) ** 2 / (w0 * w1);
    if (!Number.isFinite(between)) between = 0;
    if (between > best) { best = between; bestAt = i; }
  }
  return bestAt;
}

export class NoDigit extends Error {}

function blank() {
  return new NoDigit("no digit found: the image is blank (draw or upload a digit)");
}

// preprocess.mnist_digit: RGBA -> {width: 28, height: 28, channels: 1, data}
export function mnistDigit(rgba) {
  const greyImage = grey(onWhite(rgba));
  let { width: w, height: h } = greyImage;
  let gray = Float32Array.from(greyImage.data);
  const lightPaper = median(borderValues(gray, w, h)) > 127;
  if (w === 28 && h === 28) {
    return { width: 28, height: 28, channels: 1, data: Uint8Array.from(gray, (v) => (lightPaper ? 255 - v : v)) };
  }
  const scale = Math.min(1.0, WORK_SIDE / Math.max(w, h));
  if (scale < 1.0) {
    const small = resize(greyImage, Math.max(1, pyRound(w * scale)), Math.max(1, pyRound(h * scale)), "box");
    w = small.width; h = small.height;
    gray = Float32Array.from(small.data);
  }
  if (lightPaper) gray = gray.map((v) => f32(255.0 - v));
  const surface = paperSurface(gray, w, h);
  const ink = gray.map((v, i) => Math.max(f32(v - surface[i]), 0));
  const peak = percentile(ink, 99.9);
  if (peak < 24) throw blank();
  const stretch = f32(255.0 / peak);
  const threshold = Math.max(otsu(ink.map((v) => f32(v * stretch))) * peak / 255.0, 0.2 * peak);
  // ink where the 3x3 neighbourhood has ink too
  const local = new Float32Array(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let s = 0;
      for (let i = 0; i < 3; i++) {
        for (let j = 0; j < 3; j++) {
          s = f32(s + ink[Math.min(h - 1, Math.max(0, y + i - 1)) * w + Math.min(w - 1, Math.max(0, x + j - 1))]);
        }
      }
      local[y * w + x] = f32(s / 9.0);
    }
  }
  const t32 = f32(threshold), t06 = f32(0.6 * threshold);
  const mask = Uint8Array.from(ink, (v, i) => (v > t32 && local[i] > t06 ? 1 : 0));
  const found = bbox((i) => mask[i], w, h);
  if (!found) throw blank();
  const inMask = ink.filter((_, i) => mask[i]);
  const p90 = percentile(inMask, 90);
  // NumPy: float32 ink minus a Python float stays float32; divided by a NumPy float64 (the percentile) it becomes float64
  const half = f32(0.5 * threshold);
  const denominator = Math.max(1e-6, p90 - 0.5 * threshold);
  const grown = rank(mask, w, h, 3, max);
  const strokes = Float64Array.from(ink, (v, i) => Math.min(1, Math.max(0, f32(v - half) / denominator)) * 255.0 * grown[i]);
  const coreLevel = 0.5 * p90; // a float64 comparison, as NumPy makes it
  const core = Uint8Array.from(ink, (v) => (v > coreLevel ? 1 : 0));
  const shrunk = rank(core, w, h, 3, min);
  const { top, bottom, left, right } = found;
  let area = 0, edge = 0;
  for (let y = top; y < bottom; y++) {
    for (let x = left; x < right; x++) {
      area += core[y * w + x];
      edge += core[y * w + x] && !shrunk[y * w + x] ? 1 : 0;
    }
  }
  const width = 2.0 * area / Math.max(1, edge);
  const cropped = towardsMnistStroke(crop(strokes, w, top, bottom, left, right), right - left, bottom - top, width);
  return fitAndCentre(cropped.data, cropped.width, cropped.height);
}

function towardsMnistStroke(data, w, h, width) {
  const longSide = Math.max(w, h);
  const target = MNIST_STROKE * longSide / 20.0;
  const limit = Math.max(1, Math.floor(longSide / 12));
  if (width > 2.0 * target) {
    return { data: rank(data, w, h, 2 * Math.min(limit, pyRound((width - target) / 2)) + 1, min), width: w, height: h };
  }
  if (width < 0.6 * target && pyRound((target - width) / 2) >= 1) {
    const pw = w + 2 * limit, ph = h + 2 * limit;
    const padded = new data.constructor(pw * ph);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) padded[(y + limit) * pw + x + limit] = data[y * w + x];
    const grown = rank(padded, pw, ph, 2 * Math.min(limit, pyRound((target - width) / 2)) + 1, max);
    const found = bbox((i) => grown[i] > 0.15 * 255, pw, ph);
    if (!found) return { data: grown, width: pw, height: ph };
    return { data: crop(grown, pw, found.top, found.bottom, found.left, found.right), width: found.right - found.left, height: found.bottom - found.top };
  }
  return { data, width: w, height: h };
}

// preprocess.fit_and_centre: into 20x20 (aspect kept), centred by the centre of mass in 28x28
export function fitAndCentre(data, w, h, box = 20, frame = 28) {
  const s = box / Math.max(h, w);
  const size = [Math.max(1, pyRound(w * s)), Math.max(1, pyRound(h * s))];
  const img = { width: w, height: h, channels: 1, data: Uint8Array.from(data, (v) => Math.trunc(Math.min(255, Math.max(0, v)))) };
  const small = resize(img, size[0], size[1], "lanczos");
  let total = 0, sy = 0, sx = 0;
  for (let y = 0; y < small.height; y++) {
    for (let x = 0; x < small.width; x++) {
      const v = small.data[y * small.width + x];
      total += v; sy += y * v; sx += x * v;
    }
  }
  if (total <= 0) throw blank();
  const halfFrame = frame / 2;
  const y0 = Math.min(Math.max(pyRound(halfFrame - sy / total), 0), frame - small.height);
  const x0 = Math.min(Math.max(pyRound(halfFrame - sx / total), 0), frame - small.width);
  const out = new Uint8Array(frame * frame);
  for (let y = 0; y < small.height; y++) for (let x = 0; x < small.width; x++) out[(y + y0) * frame + x + x0] = small.data[y * small.width + x];
  return { width: frame, height: frame, channels: 1, data: out };
}

// ------------------------------------------------------------------------------------------- garments and pictures

// preprocess.garment: RGBA -> {side x side, one channel}
export function garment(rgba, side = 28) {
  let img = grey(onWhite(rgba));
  let { width: w, height: h } = img;
  let gray = img.data;
  if (median(borderValues(gray, w, h)) > 127) gray = gray.map((v) => 255 - v);
  if (w === side && h === side) return { width: side, height: side, channels: 1, data: gray };
  const background = Math.trunc(median(borderValues(gray, w, h)));
  if (background > 0) {
    const k = f32(255.0 / (255 - background));
    gray = gray.map((v) => Math.trunc(Math.min(255, Math.max(0, f32(f32(v - background) * k)))));
  }
  const found = bbox((i) => gray[i] > 24, w, h);
  if (found) {
    gray = crop(gray, w, found.top, found.bottom, found.left, found.right);
    w = found.right - found.left; h = found.bottom - found.top;
  }
  const scale = side / Math.max(h, w);
  const small = resize({ width: w, height: h, channels: 1, data: gray }, Math.max(1, pyRound(w * scale)), Math.max(1, pyRound(h * scale)), "lanczos");
  const out = new Uint8Array(side * side);
  const x0 = Math.floor((side - small.width) / 2), y0 = Math.floor((side - small.height) / 2);
  for (let y = 0; y < small.height; y++) for (let x = 0; x < small.width; x++) out[(y + y0) * side + x + x0] = small.data[y * small.width + x];
  return { width: side, height: side, channels: 1, data: out };
}

// Pillow's Image.reduce (ImagingReduce): the mean of each xscale x yscale block in fixed point, the last
// column and row over what is left of their blocks
export function reduce(img, xscale, yscale) {
  const { width: w, height: h, channels: c } = img;
  const ow = Math.ceil(w / xscale), oh = Math.ceil(h / yscale);
  const out = new Uint8Array(ow * oh * c);
  for (let y = 0; y < oh; y++) {
    const rows = Math.min(yscale, h - y * yscale);
    for (let x = 0; x < ow; x++) {
      const cols = Math.min(xscale, w - x * xscale);
      const n = rows * cols;
      const multiplier = Math.trunc(f32(f32(4294967296) / f32(256 * n)));
      for (let ch = 0; ch < c; ch++) {
        let ss = Math.floor(n / 2);
        for (let yy = 0; yy < rows; yy++) for (let xx = 0; xx < cols; xx++) ss += img.data[((y * yscale + yy) * w + x * xscale + xx) * c + ch];
        out[(y * ow + x) * c + ch] = Math.floor((ss * multiplier) / 16777216); // (ss * multiplier) >> 24, below 2 ** 32
      }
    }
  }
  return { width: ow, height: oh, channels: c, data: out };
}

// preprocess.resized_image: the whole picture at side x side, as Image.resize(..., LANCZOS, reducing_gap=3.0)
export function resizedImage(rgba, side, channels) {
  let img = onWhite(rgba);
  if (channels === 1) img = grey(img);
  const fx = Math.trunc(img.width / side / 3.0) || 1, fy = Math.trunc(img.height / side / 3.0) || 1;
  if (fx > 1 || fy > 1) {
    const [w, h] = [img.width, img.height];
    return resize(reduce(img, fx, fy), side, side, "lanczos", [0, 0, w / fx, h / fy]);
  }
  return resize(img, side, side, "lanczos");
}

// ------------------------------------------------------------------------------------------- the model's input

// spec: the web export's model.json; pixels: {width, height, channels, data} -> Float32Array or Uint8Array NCHW/NHWC
export function modelPixels(rgba, spec) {
  const [channels, side] = [spec.input.chw[0], spec.input.chw[1]];
  if (spec.preparation === "digit") return mnistDigit(rgba);
  if (spec.preparation === "garment") return garment(rgba, side);
  return resizedImage(rgba, side, channels);
}

export function toInput(pixels, spec) {
  // preprocess.to_input + normalize: x / (1 / scale), - mean, / std, each rounded to float32
  const [c, h, w] = spec.input.chw;
  const nhwc = spec.input.layout === "NHWC";
  const out = spec.input.dtype === "uint8" ? new Uint8Array(c * h * w) : new Float32Array(c * h * w);
  const divisor = f32(1.0 / spec.normalization.scale);
  for (let ch = 0; ch < c; ch++) {
    const mean = f32(spec.normalization.mean[ch]), std = f32(spec.normalization.std[ch]);
    for (let i = 0; i < h * w; i++) {
      const v = pixels.data[i * c + ch];
      const at = nhwc ? i * c + ch : ch * h * w + i;
      out[at] = spec.input.dtype === "uint8" ? v : f32(f32(f32(v / divisor) - mean) / std);
    }
  }
  return out;
}
