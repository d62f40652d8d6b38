// Drawing: the jet colormap, bilinear upsampling of a patch map, overlays, colour bar and chart.
// Everything is drawn pixel by pixel from the JSON the API answers, so what is on screen is the
// answer itself (the tests compare these pixels with their own rendering of the same JSON).

// matplotlib's jet: piecewise linear (x, value) knots per channel
const JET = {
  r: [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
  g: [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
  b: [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]],
};

function interp(knots, x) {
  for (let i = 1; i < knots.length; i++) {
    const [x1, y1] = knots[i];
    if (x <= x1) {
      const [x0, y0] = knots[i - 1];
      return x1 === x0 ? y1 : y0 + ((y1 - y0) * (x - x0)) / (x1 - x0);
    }
  }
  return knots[knots.length - 1][1];
}

// 256 RGB entries, entry i = jet(i / 255); a value v in [0, 1] takes entry floor(v * 255)
export const LUT = (() => {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = i / 255;
    lut[3 * i] = Math.round(255 * interp(JET.r, x));
    lut[3 * i + 1] = Math.round(255 * interp(JET.g, x));
    lut[3 * i + 2] = Math.round(255 * interp(JET.b, x));
  }
  return lut;
})();

// (gh rows of gw values) -> Float32Array(w * h), bilinear with pixel centres aligned (as PIL's
// BILINEAR resize upsamples, which the service's own heatmaps use), clipped to [0, 1]
export function upsample(mask, w, h) {
  const gh = mask.length, gw = mask[0].length;
  const out = new Float32Array(w * h);
  const xs = new Int32Array(w), xf = new Float32Array(w);
  for (let x = 0; x < w; x++) {
    const sx = Math.min(Math.max(((x + 0.5) * gw) / w - 0.5, 0), gw - 1);
    xs[x] = Math.min(Math.floor(sx), Math.max(gw - 2, 0));
    xf[x] = gw > 1 ? sx - xs[x] : 0;
  }
  for (let y = 0; y < h; y++) {
    const sy = Math.min(Math.max(((y + 0.5) * gh) / h - 0.5, 0), gh - 1);
    const y0 = Math.min(Math.floor(sy), Math.max(gh - 2, 0));
    const fy = gh > 1 ? sy - y0 : 0;
    const r0 = mask[y0], r1 = mask[Math.min(y0 + 1, gh - 1)];
    for (let x = 0; x < w; x++) {
      const x0 = xs[x], x1 = Math.min(x0 + 1, gw - 1), fx = xf[x];
      const top = r0[x0] + (r0[x1] - r0[x0]) * fx;
      const bottom = r1[x0] + (r1[x1] - r1[x0]) * fx;
      const v = top + (bottom - top) * fy;
      out[y * w + x] = v < 0 ? 0 : v > 1 ? 1 : v;
    }
  }
  return out;
}

// the mask as jet colours, opaque, at w x h
export function heatImage(mask, w, h) {
  const values = upsample(mask, w, h);
  const img = new ImageData(w, h);
  const d = img.data;
  for (let i = 0; i < values.length; i++) {
    const k = 3 * Math.min(255, Math.floor(values[i] * 255));
    d[4 * i] = LUT[k];
    d[4 * i + 1] = LUT[k + 1];
    d[4 * i + 2] = LUT[k + 2];
    d[4 * i + 3] = 255;
  }
  return img;
}

// the size a picture is drawn at: its own, brought to between `min` and `max` on its longer side
export function fit(width, height, max = 512, min = 384) {
  const long = Math.max(width, height);
  const s = long < min ? min / long : Math.min(1, max / long);
  return [Math.max(1, Math.round(width * s)), Math.max(1, Math.round(height * s))];
}

export function drawImage(canvas, img, w, h) {
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(img, 0, 0, w, h);
}

export function drawHeat(canvas, mask, w, h) {
  canvas.width = w;
  canvas.height = h;
  canvas.getContext("2d", { willReadFrequently: true }).putImageData(heatImage(mask, w, h), 0, 0);
}

// a new canvas: the picture with the heat over it at `alpha` (what the stage shows, flattened)
export function composite(img, mask, w, h, alpha) {
  const out = document.createElement("canvas");
  drawImage(out, img, w, h);
  if (mask) {
    const heat = document.createElement("canvas");
    drawHeat(heat, mask, w, h);
    const ctx = out.getContext("2d");
    ctx.globalAlpha = alpha;
    ctx.drawImage(heat, 0, 0);
    ctx.globalAlpha = 1;
  }
  return out;
}

// the colour bar: jet from 0 to 1, left to right, with ticks
export function colourBar(canvas, width = 256, height = 34) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const bar = 14;
  for (let x = 0; x < width; x++) {
    const k = 3 * Math.min(255, Math.floor((x / (width - 1)) * 255));
    ctx.fillStyle = `rgb(${LUT[k]},${LUT[k + 1]},${LUT[k + 2]})`;
    ctx.fillRect(x, 0, 1, bar);
  }
  ctx.fillStyle = getComputedStyle(canvas).color || "#222";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "top";
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    const x = Math.round(t * (width - 1));
    ctx.fillRect(x, bar, 1, 4);
    ctx.textAlign = t === 0 ? "left" : t === 1 ? "right" : "center";
    ctx.fillText(String(t), x, bar + 6);
  }
}

// a line chart of values (objective per step); `total` steps on the x axis
export function lineChart(canvas, values, total) {
  const w = canvas.width, h = canvas.height, pad = 4;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) return;
  let lo = Math.min(...finite), hi = Math.max(...finite);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const n = Math.max(total || values.length, 2);
  ctx.strokeStyle = "#d9480f";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    if (!Number.isFinite(v)) return;
    const x = pad + ((w - 2 * pad) * i) / (n - 1);
    const y = h - pad - ((h - 2 * pad) * (v - lo)) / (hi - lo);
    i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = getComputedStyle(canvas).color || "#222";
  ctx.font = "10px system-ui, sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText(hi.toPrecision(4), pad + 2, pad);
  ctx.textBaseline = "bottom";
  ctx.fillText(lo.toPrecision(4), pad + 2, h - pad);
}

// Deletion (red) and insertion (blue) curves over s / k in [0, 1]; the probability axis runs from 0
// to the curves' highest value, written at the top left.
export function curves(canvas, deletion, insertion) {
  const w = canvas.width, h = canvas.height, pad = 4;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const top = Math.max(...deletion, ...insertion, 1e-12);
  const line = (values, colour) => {
    const n = Math.max(values.length, 2);
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = pad + ((w - 2 * pad) * i) / (n - 1);
      const y = h - pad - ((h - 2 * pad) * Math.max(0, v)) / top;
      i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y);
    });
    ctx.stroke();
  };
  line(deletion, "#d9480f");
  line(insertion, "#1c7ed6");
  ctx.fillStyle = "#555";
  ctx.font = "10px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.fillText(`p ≤ ${top.toPrecision(3)}`, pad + 2, pad);
}
