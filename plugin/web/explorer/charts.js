/* rtharvest: a tiny hand-written SVG chart routine (grouped vertical bars, horizontal bars).
 * No library on purpose: the page runs in hospital networks without internet, and two chart types do
 * not justify vendoring one. Everything is built with createElementNS and textContent (no markup
 * strings), so labels coming from DICOM data can never inject anything. */
(function (global) {
  'use strict';
  var NS = 'http://www.w3.org/2000/svg';

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function text(parent, x, y, value, attrs) {
    var t = el('text', Object.assign({ x: x, y: y }, attrs || {}), parent);
    t.textContent = value;
    return t;
  }

  function tooltip(node, value) {
    var t = el('title', {}, node);
    t.textContent = value;
  }

  // A "nice" axis: 0..top in about five steps of 1, 2 or 5 times a power of ten (integers only:
  // these are counts of patients and plans).
  function niceScale(max) {
    if (!(max > 0)) { return { top: 1, step: 1 }; }
    var raw = max / 5;
    var power = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * power; }).find(function (s) { return s >= raw; });
    step = Math.max(1, Math.round(step));
    return { top: Math.ceil(max / step) * step, step: step };
  }

  function clear(container) {
    while (container.firstChild) { container.removeChild(container.firstChild); }
  }

  function empty(container, message, width, height) {
    clear(container);
    var svg = el('svg', { viewBox: '0 0 ' + width + ' ' + height, role: 'img', 'aria-label': message }, container);
    text(svg, width / 2, height / 2, message, { 'text-anchor': 'middle' });
    return svg;
  }

  /* Grouped vertical bars.
   * opts: {labels: [..], series: [{name, color, values: [..]}], width, height, unit} */
  function bars(container, opts) {
    var W = opts.width || 720, H = opts.height || 260;
    var labels = opts.labels || [], series = opts.series || [];
    if (!labels.length) { return empty(container, opts.emptyText || 'No data yet', W, H); }
    clear(container);
    var m = { left: 40, right: 10, top: 24, bottom: labels[0].length > 4 ? 56 : 28 };
    var pw = W - m.left - m.right, ph = H - m.top - m.bottom;
    var max = 0;
    series.forEach(function (s) { s.values.forEach(function (v) { max = Math.max(max, v || 0); }); });
    var scale = niceScale(max);
    var svg = el('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': opts.title || 'bar chart' },
                 container);
    // Grid lines and y ticks.
    for (var v = 0; v <= scale.top; v += scale.step) {
      var y = m.top + ph - (v / scale.top) * ph;
      el('line', { x1: m.left, x2: W - m.right, y1: y, y2: y, stroke: v === 0 ? '#9aa5b1' : '#e4e7eb' }, svg);
      text(svg, m.left - 6, y + 4, String(v), { 'text-anchor': 'end' });
    }
    var n = labels.length, group = pw / n;
    var inner = Math.max(1, group * 0.8), bw = inner / Math.max(1, series.length);
    // Thin the x labels so that they never overlap (about 16 fit).
    var every = Math.max(1, Math.ceil(n / 16));
    labels.forEach(function (label, i) {
      var x0 = m.left + i * group + (group - inner) / 2;
      series.forEach(function (s, j) {
        var value = s.values[i] || 0;
        var h = (value / scale.top) * ph;
        var rect = el('rect', {
          x: (x0 + j * bw).toFixed(2), y: (m.top + ph - h).toFixed(2),
          width: Math.max(0.5, bw - (series.length > 1 ? 1 : 0)).toFixed(2), height: h.toFixed(2),
          fill: s.color, 'data-series': s.name, 'data-label': label, 'data-value': value
        }, svg);
        tooltip(rect, label + ': ' + value + ' ' + s.name.toLowerCase());
      });
      if (i % every === 0) {
        var cx = m.left + i * group + group / 2, ly = m.top + ph + 14;
        if (label.length > 4) {
          text(svg, cx, ly, label, { 'text-anchor': 'end', transform: 'rotate(-45 ' + cx + ' ' + ly + ')' });
        } else {
          text(svg, cx, ly, label, { 'text-anchor': 'middle' });
        }
      }
    });
    // Legend, top right.
    var lx = W - m.right;
    series.slice().reverse().forEach(function (s) {
      text(svg, lx, 12, s.name, { 'text-anchor': 'end' });
      lx -= s.name.length * 6.5 + 6;
      el('rect', { x: lx - 10, y: 3, width: 10, height: 10, fill: s.color }, svg);
      lx -= 22;
    });
    return svg;
  }

  /* Horizontal bars, one per item: opts {items: [{label, value, color}], width, unit} */
  function hbars(container, opts) {
    var items = opts.items || [];
    var W = opts.width || 360, row = 22;
    var H = Math.max(60, items.length * row + 16);
    if (!items.length) { return empty(container, opts.emptyText || 'No data yet', W, 60); }
    clear(container);
    var svg = el('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': opts.title || 'bar chart' },
                 container);
    var labelW = Math.min(130, 12 + Math.max.apply(null, items.map(function (it) { return it.label.length; })) * 6.5);
    var max = Math.max.apply(null, items.map(function (it) { return it.value; })) || 1;
    var pw = W - labelW - 40;
    items.forEach(function (it, i) {
      var y = 8 + i * row;
      text(svg, labelW - 6, y + 12, it.label, { 'text-anchor': 'end' });
      var w = Math.max(it.value > 0 ? 2 : 0, (it.value / max) * pw);
      var rect = el('rect', { x: labelW, y: y + 2, width: w.toFixed(2), height: row - 6, fill: it.color || '#4e79a7',
                              'data-label': it.label, 'data-value': it.value }, svg);
      tooltip(rect, it.label + ': ' + it.value + (opts.unit ? ' ' + opts.unit : ''));
      text(svg, labelW + w + 4, y + 12, String(it.value));
    });
    return svg;
  }

  global.RtCharts = { bars: bars, hbars: hbars, niceScale: niceScale };
})(window);
