// flagmatch map: the run's 2-D coordinates as a scatter on a canvas (one pixel write per point, so
// 100k points draw in milliseconds). Colour by cluster, flag state, review status or P(unsafe), with a
// legend. Drag pans; shift-drag (or "Box select") selects a box, alt-drag (or "Lasso") a free shape;
// wheel or +/- zooms; arrows pan; 0 resets;
// hover shows a blurred thumbnail; click opens the image. The view and colouring live in the URL hash.
"use strict";
(function () {
  const canvas = document.getElementById("map");
  if (!canvas) return;
  const ctx = canvas.getContext("2d");
  const tip = document.getElementById("tip");
  const status = document.getElementById("map-status");
  const legendBox = document.getElementById("legend");
  const colourSel = document.getElementById("colour-by");
  const boxBtn = document.getElementById("box-mode");
  const lassoBtn = document.getElementById("lasso-mode");
  const PAD = 12;
  let W = canvas.width, H = canvas.height;
  let pts = null;           // {n, x: Float32Array (0..1), y, id: Int32Array, cl: Int32Array, p: Uint8Array, f: Uint8Array}
  let clusters = new Map(); // id -> {name, status, size}
  let view = {x0: 0, x1: 1, y0: 0, y1: 1};
  let grid = null, drag = null, boxMode = false, lassoMode = false, lastBox = null;
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
  const GREY = [170, 170, 170];
  const FLAG = {1: [200, 40, 40], 0: [40, 120, 200], 2: [200, 200, 200]};
  const REVIEW = {unreviewed: [230, 150, 0], confirmed: [200, 40, 40], dismissed: [40, 150, 70], none: GREY};
  const ramp = (v) => [Math.round(40 + 200 * v), Math.round(120 - 80 * v), Math.round(200 - 170 * v)];
  const sx = (x) => PAD + (x - view.x0) / (view.x1 - view.x0) * (W - 2 * PAD);
  const sy = (y) => H - PAD - (y - view.y0) / (view.y1 - view.y0) * (H - 2 * PAD);

  function colourOf(i) {
    const mode = colourSel.value;
    if (mode === "flag") return pts.f ? FLAG[pts.f[i]] : GREY;
    if (mode === "p_unsafe") return pts.p ? ramp(pts.p[i] / 255) : GREY;
    if (mode === "review") {
      const c = clusters.get(pts.cl[i]);
      return pts.cl[i] < 0 || !c ? REVIEW.none : REVIEW[c.status] || GREY;
    }
    return pts.cl[i] < 0 ? GREY : palette[pts.cl[i] % palette.length];
  }

  // ---------------------------------------------------------------- state in the URL
  function saveState() {
    const v = [view.x0, view.x1, view.y0, view.y1].map((z) => z.toFixed(4)).join(",");
    history.replaceState(null, "", "#v=" + v + "&c=" + colourSel.value);
  }
  function readState() {
    const q = new URLSearchParams(location.hash.slice(1));
    const v = (q.get("v") || "").split(",").map(Number);
    if (v.length === 4 && v.every(Number.isFinite) && v[1] > v[0] && v[3] > v[2]) view = {x0: v[0], x1: v[1], y0: v[2], y1: v[3]};
    if (q.get("c") && Array.from(colourSel.options).some((o) => o.value === q.get("c"))) colourSel.value = q.get("c");
  }

  // ---------------------------------------------------------------- size: as wide as the page allows
  function fit() {
    const wrap = canvas.parentElement;
    const w = Math.max(280, Math.min(1400, Math.floor(wrap.clientWidth || 1000)));
    const h = Math.max(240, Math.min(Math.round(w * 0.7), window.innerHeight - 160));  // the whole map in view
    if (w !== W || h !== H) {
      canvas.width = W = w;
      canvas.height = H = h;
      if (pts) draw(lastBox);
    }
  }

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
    pts = {n, x, y, id: ids, cl, p: null, f: null};
    fit();
    draw();
    canvas.dataset.points = String(n);
    canvas.dataset.drawMs = (performance.now() - t0).toFixed(1);
    status.textContent = n + " points · drawn in " + canvas.dataset.drawMs + " ms";
    restoreSelection();
    document.body.dataset.mapReady = "1";
    // what else it can be coloured by: fetched after the first draw
    const [attrs, legend] = await Promise.all([
      fetch(canvas.dataset.attrs, {credentials: "same-origin"}).then((r) => r.arrayBuffer()),
      fetch(canvas.dataset.legend, {credentials: "same-origin"}).then((r) => r.json())]);
    pts.p = new Uint8Array(attrs, 0, n);
    pts.f = new Uint8Array(attrs, n, n);
    clusters = new Map(legend.clusters.map((c) => [c.id, c]));
    draw(lastBox);
    document.body.dataset.mapColours = "1";
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
      const c = colourOf(i);
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
    if (box && box.path) {
      ctx.strokeStyle = "#2454c5"; ctx.lineWidth = 1.5;
      ctx.fillStyle = "rgba(36,84,197,.08)";
      ctx.beginPath();
      box.path.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
      ctx.closePath(); ctx.fill(); ctx.stroke();
    } else if (box) {
      ctx.strokeStyle = "#2454c5"; ctx.lineWidth = 1;
      ctx.fillStyle = "rgba(36,84,197,.08)";
      ctx.fillRect(box.x, box.y, box.w, box.h);
      ctx.strokeRect(box.x, box.y, box.w, box.h);
    }
    legend();
    saveState();
  }

  function swatch(c, label) {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = "rgb(" + c.join(",") + ")";
    li.append(sw, document.createTextNode(" " + label));
    return li;
  }
  function legend() {
    if (!legendBox) return;
    const mode = colourSel.value, items = [];
    if (mode === "flag") {
      items.push(swatch(FLAG[1], "flagged"), swatch(FLAG[0], "unflagged since the run"), swatch(FLAG[2], "deleted"));
    } else if (mode === "review") {
      ["unreviewed", "confirmed", "dismissed"].forEach((s) => items.push(swatch(REVIEW[s], s)));
      items.push(swatch(REVIEW.none, "unclustered"));
    } else if (mode === "p_unsafe") {
      [0, 0.5, 1].forEach((v) => items.push(swatch(ramp(v), "P(unsafe) " + v.toFixed(1))));
    } else {
      const biggest = Array.from(clusters.values()).sort((a, b) => b.size - a.size).slice(0, 16);
      biggest.forEach((c) => items.push(swatch(palette[c.id % palette.length], "#" + c.id + " " + (c.name || "unnamed") + " (" + c.size + ")")));
      items.push(swatch(GREY, "unclustered"));
    }
    legendBox.replaceChildren(...items);
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
  const norm = (b) => ({x: Math.min(b.x, b.x + b.w), y: Math.min(b.y, b.y + b.h), w: Math.abs(b.w), h: Math.abs(b.h)});

  function pan(fx, fy) {
    const w = view.x1 - view.x0, h = view.y1 - view.y0;
    view = {x0: view.x0 + fx * w, x1: view.x1 + fx * w, y0: view.y0 + fy * h, y1: view.y1 + fy * h};
    draw(lastBox = null);
  }
  function zoom(k, mx, my) {
    const fx = view.x0 + (mx - PAD) / (W - 2 * PAD) * (view.x1 - view.x0);
    const fy = view.y0 + (H - PAD - my) / (H - 2 * PAD) * (view.y1 - view.y0);
    view = {x0: fx - (fx - view.x0) * k, x1: fx + (view.x1 - fx) * k, y0: fy - (fy - view.y0) * k, y1: fy + (view.y1 - fy) * k};
    draw(lastBox = null);
  }

  function inside(path, px, py) {  // ray casting: a point is inside when a ray crosses the path an odd number of times
    let hit = false;
    for (let a = 0, b = path.length - 1; a < path.length; b = a++) {
      const [xa, ya] = path[a], [xb, yb] = path[b];
      if ((ya > py) !== (yb > py) && px < (xb - xa) * (py - ya) / (yb - ya) + xa) hit = !hit;
    }
    return hit;
  }

  function select(b) {
    const picked = [];
    for (let i = 0; i < pts.n; i++) {
      const px = sx(pts.x[i]), py = sy(pts.y[i]);
      if (b.path ? inside(b.path, px, py) : (px >= b.x && px <= b.x + b.w && py >= b.y && py <= b.y + b.h)) {
        picked.push(pts.id[i]);
      }
    }
    draw(lastBox = b);
    showSelection(picked);
    try {  // kept for this tab: Back from the selection page finds it again
      sessionStorage.setItem(SEL_KEY, JSON.stringify({ids: picked, box: b, hash: location.hash}));
    } catch (e) { /* storage full or off: the selection lasts as long as the page */ }
  }

  const SEL_KEY = "flagmatch-map-selection:" + canvas.dataset.src;
  function showSelection(picked) {
    const form = document.getElementById("selection-form");
    document.getElementById("selection-ids").value = picked.join(",");
    document.getElementById("selection-count").textContent = picked.length + " selected";
    form.classList.toggle("hidden", picked.length === 0);
    canvas.dataset.selected = String(picked.length);
  }
  function restoreSelection() {
    let saved = null;
    try { saved = JSON.parse(sessionStorage.getItem(SEL_KEY) || "null"); } catch (e) { saved = null; }
    if (!saved || !Array.isArray(saved.ids) || !saved.ids.length) return;
    const known = new Set(pts.id);
    const ids = saved.ids.filter((i) => known.has(i));
    if (!ids.length) return;
    if (saved.hash === location.hash) lastBox = saved.box;  // the outline is in this view's coordinates
    showSelection(ids);
    draw(lastBox);
  }

  canvas.addEventListener("mousemove", (e) => {
    if (!pts) return;
    const [mx, my] = pos(e);
    if (drag) {
      if (drag.lasso) {
        drag.path.push([mx, my]);
        draw({path: drag.path});
      } else if (drag.box) {
        drag.w = mx - drag.x; drag.h = my - drag.y;
        draw(norm(drag));
      } else {
        const dx = (mx - drag.lx) / (W - 2 * PAD) * (view.x1 - view.x0);
        const dy = (my - drag.ly) / (H - 2 * PAD) * (view.y1 - view.y0);
        drag.lx = mx; drag.ly = my; drag.moved = true;
        view = {x0: view.x0 - dx, x1: view.x1 - dx, y0: view.y0 + dy, y1: view.y1 + dy};
        draw(lastBox = null);
      }
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
    const c = clusters.get(pts.cl[i]);
    tip.querySelector("span").textContent = "#" + pts.id[i] + (pts.cl[i] < 0 ? " · unclustered" :
      " · cluster " + pts.cl[i] + (c && c.name ? " " + c.name : "")) + (pts.p ? " · P " + (pts.p[i] / 255).toFixed(2) : "");
  });
  canvas.addEventListener("mouseleave", () => tip.classList.add("hidden"));
  canvas.addEventListener("mousedown", (e) => {
    const [x, y] = pos(e);
    drag = {x, y, w: 0, h: 0, lx: x, ly: y, box: boxMode || e.shiftKey, lasso: lassoMode || e.altKey,
            path: [[x, y]], moved: false};
  });
  window.addEventListener("mouseup", (e) => {  // (on the window: a drag may end outside the canvas)
    if (!pts || !drag) return;
    const d = drag;
    drag = null;
    const b = norm(d);
    if (d.lasso && d.path.length > 3) { select({path: d.path}); return; }
    if (d.box && (b.w >= 4 || b.h >= 4)) { select(b); return; }
    if (!d.box && d.moved) return;  // a pan
    if (e.target !== canvas) return;
    const [mx, my] = pos(e);  // a click
    const i = nearest(mx, my);
    if (i >= 0) window.location.href = url(canvas.dataset.image, pts.id[i]);
  });
  canvas.addEventListener("wheel", (e) => {
    if (!pts) return;
    e.preventDefault();
    const [mx, my] = pos(e);
    zoom(e.deltaY < 0 ? 0.8 : 1.25, mx, my);
  }, {passive: false});
  canvas.addEventListener("dblclick", () => { view = {x0: 0, x1: 1, y0: 0, y1: 1}; draw(lastBox = null); });
  canvas.addEventListener("keydown", (e) => {
    if (!pts) return;
    const keys = {ArrowLeft: () => pan(-0.1, 0), ArrowRight: () => pan(0.1, 0), ArrowUp: () => pan(0, 0.1),
                  ArrowDown: () => pan(0, -0.1), "+": () => zoom(0.8, W / 2, H / 2), "=": () => zoom(0.8, W / 2, H / 2),
                  "-": () => zoom(1.25, W / 2, H / 2), "0": () => { view = {x0: 0, x1: 1, y0: 0, y1: 1}; draw(lastBox = null); },
                  s: () => boxBtn.click(),
                  Enter: () => select({x: PAD, y: PAD, w: W - 2 * PAD, h: H - 2 * PAD})};  // everything in view
    if (keys[e.key]) { keys[e.key](); e.preventDefault(); }
  });
  colourSel.addEventListener("change", () => draw(lastBox));
  function setMode(box, lasso) {
    boxMode = box; lassoMode = lasso;
    boxBtn.setAttribute("aria-pressed", String(boxMode));
    boxBtn.textContent = boxMode ? "Box select: on" : "Box select: off";
    lassoBtn.setAttribute("aria-pressed", String(lassoMode));
    lassoBtn.textContent = lassoMode ? "Lasso: on" : "Lasso: off";
    canvas.style.cursor = boxMode || lassoMode ? "crosshair" : "grab";
  }
  boxBtn.addEventListener("click", () => setMode(!boxMode, false));
  lassoBtn.addEventListener("click", () => setMode(false, !lassoMode));
  window.addEventListener("resize", fit);
  readState();
  load().catch((err) => { status.textContent = "could not load the map: " + err; });
})();
