// flagmatch map: the run's 2-D coordinates as a scatter on a canvas (one pixel write per point, so
// 100k points draw in milliseconds), coloured by cluster. Hover: blurred thumbnail; click: open the
// image; drag: box selection, opened as a list; wheel: zoom; double-click: reset.
"use strict";
(function () {
  const canvas = document.getElementById("map");
  if (!canvas) return;
  const ctx = canvas.getContext("2d");
  const tip = document.getElementById("tip");
  const status = document.getElementById("map-status");
  const W = canvas.width, H = canvas.height, PAD = 12;
  let pts = null;           // {n, x: Float32Array (0..1), y, id: Int32Array, cl: Int32Array}
  let view = {x0: 0, x1: 1, y0: 0, y1: 1};
  let grid = null, drag = null;
  const palette = [];
  for (let i = 0; i < 64; i++) {  // well-spread hues
    const h = (i * 137.508) % 360, s = 65 + (i % 3) * 10, l = 38 + (i % 4) * 7;
    palette.push(hsl(h, s, l));
  }
  function hsl(h, s, l) {
    s /= 100; l /= 100;
    const k = (n) => (n + h / 30) % 12, a = s * Math.min(l, 1 - l);
    const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
    return [Math.round(255 * f(0)), Math.round(255 * f(8)), Math.round(255 * f(4))];
  }
  const sx = (x) => PAD + (x - view.x0) / (view.x1 - view.x0) * (W - 2 * PAD);
  const sy = (y) => H - PAD - (y - view.y0) / (view.y1 - view.y0) * (H - 2 * PAD);

  async function load() {
    const t0 = performance.now();
    const resp = await fetch(canvas.dataset.src, {credentials: "same-origin"});
    const buf = await resp.arrayBuffer();
    const dv = new DataView(buf);
    const n = dv.getUint32(0, true);
    const qx = new Uint16Array(buf, 20, n), qy = new Uint16Array(buf, 20 + 2 * n, n);
    const ids = new Int32Array(buf.slice(20 + 4 * n, 20 + 8 * n));
    const cl = new Int32Array(buf.slice(20 + 8 * n, 20 + 12 * n));
    const x = new Float32Array(n), y = new Float32Array(n);
    for (let i = 0; i < n; i++) { x[i] = qx[i] / 65535; y[i] = qy[i] / 65535; }
    pts = {n, x, y, id: ids, cl};
    draw();
    canvas.dataset.points = String(n);
    canvas.dataset.drawMs = (performance.now() - t0).toFixed(1);
    status.textContent = n + " points · drawn in " + canvas.dataset.drawMs + " ms";
    document.body.dataset.mapReady = "1";
  }

  function draw(box) {
    const img = ctx.createImageData(W, H);
    const d = img.data;
    d.fill(255);
    grid = new Map();
    const dot = pts.n < 2000 ? 4 : pts.n < 20000 ? 3 : 2;  // small runs get bigger dots
    for (let i = 0; i < pts.n; i++) {
      const px = Math.round(sx(pts.x[i])), py = Math.round(sy(pts.y[i]));
      if (px < 1 || py < 1 || px >= W - dot || py >= H - dot) continue;
      const c = pts.cl[i] < 0 ? [170, 170, 170] : palette[pts.cl[i] % palette.length];
      for (let dy = 0; dy < dot; dy++) for (let dx = 0; dx < dot; dx++) {
        const o = ((py + dy) * W + px + dx) * 4;
        d[o] = c[0]; d[o + 1] = c[1]; d[o + 2] = c[2]; d[o + 3] = 255;
      }
      const key = (px >> 3) * 4096 + (py >> 3);
      let cell = grid.get(key);
      if (!cell) grid.set(key, cell = []);
      cell.push(i);
    }
    ctx.putImageData(img, 0, 0);
    if (box) {
      ctx.strokeStyle = "#2454c5"; ctx.lineWidth = 1;
      ctx.fillStyle = "rgba(36,84,197,.08)";
      ctx.fillRect(box.x, box.y, box.w, box.h);
      ctx.strokeRect(box.x, box.y, box.w, box.h);
    }
  }

  function nearest(mx, my) {
    let best = -1, bd = 49;
    const cx = mx >> 3, cy = my >> 3;
    for (let gx = cx - 1; gx <= cx + 1; gx++) for (let gy = cy - 1; gy <= cy + 1; gy++) {
      const cell = grid.get(gx * 4096 + gy);
      if (!cell) continue;
      for (const i of cell) {
        const dx = sx(pts.x[i]) - mx, dy = sy(pts.y[i]) - my, dd = dx * dx + dy * dy;
        if (dd < bd) { bd = dd; best = i; }
      }
    }
    return best;
  }
  const pos = (e) => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  const url = (tpl, id) => tpl.replace(/\/0(\b|$)/, "/" + id);

  canvas.addEventListener("mousemove", (e) => {
    if (!pts) return;
    const [mx, my] = pos(e);
    if (drag) {
      drag.w = mx - drag.x; drag.h = my - drag.y;
      draw(norm(drag));
      return;
    }
    const i = nearest(mx, my);
    if (i < 0) { tip.classList.add("hidden"); return; }
    tip.classList.remove("hidden");
    tip.style.left = (mx + 14) + "px";
    tip.style.top = (my + 14) + "px";
    const img = tip.querySelector("img");
    const src = url(canvas.dataset.thumb, pts.id[i]);
    if (img.getAttribute("src") !== src) img.setAttribute("src", src);
    tip.querySelector("span").textContent = "#" + pts.id[i] + (pts.cl[i] < 0 ? " · unclustered" : " · cluster " + pts.cl[i]);
  });
  canvas.addEventListener("mouseleave", () => tip.classList.add("hidden"));
  const norm = (b) => ({x: Math.min(b.x, b.x + b.w), y: Math.min(b.y, b.y + b.h), w: Math.abs(b.w), h: Math.abs(b.h)});
  canvas.addEventListener("mousedown", (e) => { const [x, y] = pos(e); drag = {x, y, w: 0, h: 0}; });
  canvas.addEventListener("mouseup", (e) => {
    if (!pts || !drag) return;
    const b = norm(drag);
    drag = null;
    if (b.w < 4 && b.h < 4) {  // a click
      const [mx, my] = pos(e);
      const i = nearest(mx, my);
      draw();
      if (i >= 0) window.location.href = url(canvas.dataset.image, pts.id[i]);
      return;
    }
    const picked = [];
    for (let i = 0; i < pts.n; i++) {
      const px = sx(pts.x[i]), py = sy(pts.y[i]);
      if (px >= b.x && px <= b.x + b.w && py >= b.y && py <= b.y + b.h) picked.push(pts.id[i]);
    }
    draw(b);
    const form = document.getElementById("selection-form");
    document.getElementById("selection-ids").value = picked.join(",");
    document.getElementById("selection-count").textContent = picked.length + " selected";
    form.classList.toggle("hidden", picked.length === 0);
    canvas.dataset.selected = String(picked.length);
  });
  canvas.addEventListener("wheel", (e) => {
    if (!pts) return;
    e.preventDefault();
    const [mx, my] = pos(e);
    const fx = view.x0 + (mx - PAD) / (W - 2 * PAD) * (view.x1 - view.x0);
    const fy = view.y0 + (H - PAD - my) / (H - 2 * PAD) * (view.y1 - view.y0);
    const k = e.deltaY < 0 ? 0.8 : 1.25;
    view = {x0: fx - (fx - view.x0) * k, x1: fx + (view.x1 - fx) * k, y0: fy - (fy - view.y0) * k, y1: fy + (view.y1 - fy) * k};
    draw();
  }, {passive: false});
  canvas.addEventListener("dblclick", () => { view = {x0: 0, x1: 1, y0: 0, y1: 1}; draw(); });
  load().catch((err) => { status.textContent = "could not load the map: " + err; });
})();
