/* rtharvest harvests page: live progress, controls, failed jobs, errors, manifest table and charts.
 *
 * Everything is fetched from the plugin's REST API on the same origin, with relative URLs (the page is
 * <root>/rtharvest/ui, so "harvests" is <root>/rtharvest/harvests even behind a path prefix); the
 * browser resends Orthanc's Basic credentials by itself. Data is only ever inserted with textContent:
 * patient IDs and labels come from clinical systems and must never be interpreted as markup. */
(function () {
  'use strict';

  var POLL_MS = 2000, HIDDEN_POLL_MS = 10000, MANIFEST_MIN_MS = 10000, STORE_MANIFEST_MS = 30000;
  var PLAN_PAGE = 25;  // plans per page of the table
  // The plans that need a look come first: Missing, then Incomplete, Invalid, Complete.
  var STATUS_ORDER = { Missing: 0, Incomplete: 1, Invalid: 2, Complete: 3 };
  var BASE = location.pathname.replace(/ui\/?$/, '');
  var COLORS = { patients: '#4e79a7', plans: '#f28e2b' };
  var STATUS_COLORS = { Complete: '#3b8a3e', Incomplete: '#d97b0d', Missing: '#c8372d', Invalid: '#8a96a3' };
  var INTENT_COLORS = ['#4e79a7', '#59a14f', '#edc948', '#b07aa1', '#76b7b2', '#ff9da7', '#9c755f', '#bab0ac'];

  var state = {
    harvests: [], rows: new Map(), selected: null, // harvest id, '*' for the whole store, or null
    manifest: null, manifestFor: null, manifestAt: 0, manifestKey: '', manifestLoading: false,
    failed: [], log: [], schedules: [], status: null, period: 'auto', planPage: 0, polling: false
  };

  function $(id) { return document.getElementById(id); }

  function h(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'text') { node.textContent = attrs[k]; }
      else if (k === 'className') { node.className = attrs[k]; }
      else if (k.slice(0, 2) === 'on') { node.addEventListener(k.slice(2), attrs[k]); }
      else if (attrs[k] !== null && attrs[k] !== undefined) { node.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) { node.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); }
    });
    return node;
  }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  // -- HTTP ------------------------------------------------------------------------------------------

  function api(method, path, body) {
    var init = { method: method, credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json';
    }
    // Absolute and without user:password: a page opened as http://user:pass@host/... keeps them in its
    // base URL, and fetch() refuses any URL resolved against it (XHR, as Orthanc Explorer uses, does not).
    return fetch(location.origin + BASE + path, init).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        if (!resp.ok) {
          var message = (data && (data.Error || data.Message)) || (resp.status + ' ' + resp.statusText);
          var err = new Error(message);
          err.status = resp.status;
          throw err;
        }
        return data;
      });
    });
  }

  function toast(message, isError) {
    var t = $('toast');
    t.textContent = message;
    t.className = 'toast' + (isError ? ' error' : '');
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(function () { t.hidden = true; }, isError ? 8000 : 3000);
  }

  function banner(message) {
    var b = $('banner');
    b.hidden = !message;
    b.textContent = message || '';
  }

  // -- formatting ------------------------------------------------------------------------------------

  function dicomDate(d) { return d && d.length === 8 ? d.slice(0, 4) + '-' + d.slice(4, 6) + '-' + d.slice(6) : (d || ''); }
  // The end of a UID tells objects of one clinic apart; the whole UID is in the title.
  function shortUid(uid) { return uid && uid.length > 16 ? '…' + uid.slice(-12) : (uid || ''); }
  function uidCell(uid) { return h('span', { className: 'uid', title: uid || '', text: shortUid(uid) }); }
  function chip(value) { return h('span', { className: 'chip ' + (value || ''), text: value || '?' }); }
  function dateCell(d) { return h('td', { className: 'date', text: dicomDate(d) }); }
  function created(iso) { return iso ? iso.replace('T', ' ').replace('Z', '') : ''; }

  function windowText(doc) {
    var parts = [];
    if (doc.From || doc.To) { parts.push(dicomDate(doc.From) + ' – ' + dicomDate(doc.To)); }
    if (doc.PatientIDs && doc.PatientIDs.length) { parts.push(doc.PatientIDs.length + ' patient(s)'); }
    return parts.join(', ') || '–';
  }

  // -- harvest list (rows are kept and updated in place, so a click never lands on a replaced button) --

  function control(id, action) {
    if (action === 'cancel' && !window.confirm('Cancel harvest ' + id + '? A cancelled harvest cannot be resumed.')) {
      return;
    }
    api('POST', 'harvests/' + encodeURIComponent(id) + '/' + action, {}).then(function (answer) {
      toast('Harvest ' + id + ': ' + answer.State);
      poll();
    }).catch(function (err) { toast(action + ' failed: ' + err.message, true); });
  }

  function makeRow(id) {
    var cells = {};
    var tr = h('tr', { 'data-id': id });
    ['id', 'label', 'source', 'window', 'created', 'state', 'progress', 'patients', 'plans', 'actions']
      .forEach(function (k) { cells[k] = h('td'); tr.appendChild(cells[k]); });
    cells.id.appendChild(h('span', { className: 'uid', text: id }));
    cells.progress.appendChild(h('div', { className: 'progress' }, [h('div', { className: 'done' }), h('div', { className: 'failed' })]));
    cells.progress.appendChild(h('div', { className: 'progress-text' }));
    var buttons = {
      view: h('button', { type: 'button', text: 'View', 'data-action': 'view' }),
      pause: h('button', { type: 'button', text: 'Pause', 'data-action': 'pause' }),
      resume: h('button', { type: 'button', text: 'Resume', 'data-action': 'resume' }),
      cancel: h('button', { type: 'button', text: 'Cancel', className: 'danger', 'data-action': 'cancel' })
    };
    Object.keys(buttons).forEach(function (k) {
      buttons[k].addEventListener('click', function (ev) {
        ev.stopPropagation();
        if (k === 'view') { select(id); } else { control(id, k); }
      });
      cells.actions.appendChild(buttons[k]);
      cells.actions.appendChild(document.createTextNode(' '));
    });
    tr.addEventListener('click', function () { select(id); });
    return { tr: tr, cells: cells, buttons: buttons };
  }

  function renderHarvests() {
    var tbody = document.querySelector('#harvests tbody');
    var seen = new Set();
    state.harvests.forEach(function (doc, index) {
      seen.add(doc.ID);
      var row = state.rows.get(doc.ID);
      if (!row) { row = makeRow(doc.ID); state.rows.set(doc.ID, row); }
      var c = row.cells, p = doc.Progress || {};
      c.label.textContent = doc.Label || '';
      c.source.textContent = doc.Source + (doc.LookupSources && doc.LookupSources.length > 1 ? ' → ' + doc.LookupSources.join(', ') : '');
      c.window.textContent = windowText(doc);
      c.created.textContent = created(doc.CreatedAt);
      if (c.state.dataset.value !== doc.State) { clear(c.state); c.state.appendChild(chip(doc.State)); c.state.dataset.value = doc.State; }
      var total = p.JobsTotal || 0, done = p.JobsDone || 0, failed = p.JobsFailed || 0;
      var bar = c.progress.firstChild;
      bar.firstChild.style.width = (total ? 100 * done / total : 0) + '%';
      bar.lastChild.style.left = (total ? 100 * done / total : 0) + '%';
      bar.lastChild.style.width = (total ? 100 * failed / total : 0) + '%';
      bar.title = done + ' done, ' + (p.JobsRunning || 0) + ' running, ' + (p.JobsPending || 0) + ' pending, ' + failed + ' failed';
      // Failed jobs are not done: "2 of 2 jobs" once read as finished with nothing lost.
      c.progress.lastChild.textContent = done + ' of ' + total + ' jobs done' + (p.JobsRunning ? ', ' + p.JobsRunning + ' running' : '') +
        (failed ? ', ' + failed + ' failed' : '');
      c.patients.textContent = String(doc.Patients || 0);
      c.plans.textContent = (doc.PlansCollected || 0) + ' / ' + (doc.PlansReferenced || 0);
      // What the harvest's rules discarded (answers and arrivals), by reason: never silent.
      var discarded = doc.Discarded || {Count: 0, ByReason: {}};
      c.plans.title = 'plans collected / referenced by treatment records; discarded by rule: ' + discarded.Count +
        Object.keys(discarded.ByReason || {}).map(function (k) { return '\n' + k + ': ' + discarded.ByReason[k]; }).join('');
      c.patients.title = 'discarded by rule: ' + discarded.Count;
      // Only the controls that apply: a Completed or Cancelled harvest has none left.
      var final = doc.State === 'Completed' || doc.State === 'Cancelled';
      row.buttons.pause.hidden = doc.State !== 'Running';
      row.buttons.resume.hidden = doc.State !== 'Paused';
      row.buttons.cancel.hidden = final;
      row.tr.classList.toggle('selected', state.selected === doc.ID);
      if (tbody.children[index] !== row.tr) { tbody.insertBefore(row.tr, tbody.children[index] || null); }
    });
    state.rows.forEach(function (row, id) {
      if (!seen.has(id)) { row.tr.remove(); state.rows.delete(id); }
    });
    $('harvests-empty').hidden = state.harvests.length > 0;
  }

  // -- selection and manifest ------------------------------------------------------------------------

  function selectedDoc() {
    return state.harvests.find(function (d) { return d.ID === state.selected; }) || null;
  }

  function manifestPath(fmt) {
    var path = state.selected === '*' ? 'manifest' : 'harvests/' + encodeURIComponent(state.selected) + '/manifest';
    return fmt === 'csv' ? path + '?format=csv' : path;
  }

  function select(id) {
    if (state.selected === id) { return; }
    state.selected = id;
    state.manifest = null;
    state.manifestFor = null;
    state.manifestKey = '';
    state.failed = [];
    state.planPage = 0;
    history.replaceState(null, '', id === '*' ? '#store' : '#harvest=' + encodeURIComponent(id));
    $('detail').hidden = false;
    $('detail-title').textContent = id === '*' ? 'Whole store' : 'Harvest ' + id;
    $('download-json').href = BASE + manifestPath('json');
    $('download-json').setAttribute('download', (id === '*' ? 'store' : id) + '-manifest.json');
    $('download-csv').href = BASE + manifestPath('csv');
    $('download-csv').setAttribute('download', (id === '*' ? 'store' : id) + '-manifest.csv');
    renderHarvests();
    renderManifest();
    renderFailed();
    loadManifest(true);
    poll();
  }

  function manifestKey() {
    if (state.selected === '*') { return 'store'; }
    var doc = selectedDoc();
    if (!doc) { return ''; }
    var p = doc.Progress || {};
    return [doc.State, p.JobsDone, p.JobsFailed, p.JobsTotal].join('/');
  }

  // The manifest reads stored objects, so it is refreshed only when the harvest moved on, and at most
  // every MANIFEST_MIN_MS (the whole store every STORE_MANIFEST_MS).
  function loadManifest(force) {
    if (!state.selected || state.manifestLoading) { return; }
    var key = manifestKey(), now = Date.now();
    var minGap = state.selected === '*' ? STORE_MANIFEST_MS : MANIFEST_MIN_MS;
    if (!force && (key === state.manifestKey || now - state.manifestAt < minGap)) { return; }
    var target = state.selected;
    state.manifestLoading = true;
    api('GET', manifestPath('json')).then(function (m) {
      if (state.selected !== target) { return; }
      state.manifest = m;
      state.manifestFor = target;
      state.manifestAt = Date.now();
      state.manifestKey = key;
      renderManifest();
    }).catch(function (err) {
      if (state.selected !== target) { return; }
      state.manifestFor = target;
      state.manifestAt = Date.now();
      state.manifestKey = key;
      var note = err.status === 404 && target === '*' ? 'this server has no whole-store manifest route' : err.message;
      state.manifest = { error: note };
      renderManifest();
    }).then(function () { state.manifestLoading = false; });
  }

  function card(label, value, detail, alert) {
    return h('div', { className: 'card' + (alert ? ' alert' : '') }, [
      h('div', { className: 'value', text: String(value) }),
      h('div', { className: 'label', text: label }),
      detail ? h('div', { className: 'detail', text: detail }) : null
    ]);
  }

  function counts(obj) {
    return Object.keys(obj || {}).map(function (k) { return k + ' ' + obj[k]; }).join(' · ');
  }

  function renderSummary(m) {
    var box = $('summary');
    clear(box);
    if (!m || m.error) {
      box.appendChild(h('p', { className: 'empty', text: m && m.error ? 'Manifest unavailable: ' + m.error : 'Loading manifest…' }));
      return;
    }
    var s = m.Summary || {};
    var sum = function (o) { return Object.keys(o || {}).reduce(function (a, k) { return a + o[k]; }, 0); };
    var qaOnly = qaOnlyPatients(m.Plans || []);
    box.appendChild(card('Patients', s.Patients || 0, qaOnly ? qaOnly + ' with only QA plans (not in the chart per period)' : null));
    box.appendChild(card('Plans referenced', s.PlansReferenced || 0));
    box.appendChild(card('Plans collected', s.PlansCollected || 0));
    box.appendChild(card('Success rate', ((s.SuccessRate || 0) * 100).toFixed(1) + ' %', 'complete / patient plans'));
    box.appendChild(card('Invalid (QA) plans', s.InvalidPlans || 0));
    box.appendChild(card('Fractions delivered', s.Fractions || 0, 'distinct fractions of the plans'));
    box.appendChild(card('Treatment records', s.TreatmentRecords || 0,
      'delivery records' + (s.SummaryRecords ? ' (+ ' + s.SummaryRecords + ' summary)' : '')));
    box.appendChild(card('Planning series', s.PlanningSeries || 0));
    box.appendChild(card('Image series', sum(s.ImageSeries), counts(s.ImageSeries)));
    box.appendChild(card('Registrations', sum(s.Registrations), counts(s.Registrations)));
    if (s.OrphanObjects) { box.appendChild(card('Orphan objects', s.OrphanObjects, 'kept, explained by no plan', true)); }
    if (s.FailedJobs) { box.appendChild(card('Failed jobs', s.FailedJobs, 'see below', true)); }
  }

  // Patients whose every treated plan is Invalid (QA, service): counted by the Patients card, left out of
  // the chart per period (which counts patient treatments only).
  function qaOnlyPatients(plans) {
    var byPatient = {};
    plans.forEach(function (p) {
      var k = p.PatientID || '';
      byPatient[k] = (k in byPatient ? byPatient[k] : true) && p.Status === 'Invalid';
    });
    return Object.keys(byPatient).filter(function (k) { return byPatient[k]; }).length;
  }

  // Quarters and years from the months: each patient is counted in the month of their first fraction
  // only, so summing months never counts a patient twice.
  function binMonths(monthly, bin) {
    var out = [], index = {};
    monthly.forEach(function (p) {
      var label = bin === 'Yearly' ? p.Period.slice(0, 4)
        : p.Period.slice(0, 4) + '-Q' + (Math.floor((parseInt(p.Period.slice(5, 7), 10) - 1) / 3) + 1);
      if (!(label in index)) { index[label] = out.length; out.push({ Period: label, Patients: 0, Plans: 0 }); }
      out[index[label]].Patients += p.Patients;
      out[index[label]].Plans += p.Plans;
    });
    return out;
  }

  // The bin by the span: months up to two years, quarters up to eight, years beyond (a bar stays wide
  // enough to see and to point at).
  function autoBin(months) { return months <= 24 ? 'Monthly' : months <= 96 ? 'Quarterly' : 'Yearly'; }

  var BIN_NAMES = { Monthly: 'month', Quarterly: 'quarter', Yearly: 'year' };

  function renderCharts(m) {
    var charts = (m && m.Charts) || {};
    var monthly = charts.Monthly || [];
    var bin = state.period === 'auto' ? autoBin(monthly.length) : state.period;
    var periods = bin === 'Monthly' ? monthly : binMonths(monthly, bin);
    var qaPlans = ((m && m.Plans) || []).filter(function (p) { return p.Status === 'Invalid'; }).length;
    $('chart-time-note').textContent = '(' + (state.period === 'auto' ? BIN_NAMES[bin] + 's for this span, ' : '') +
      'by first fraction; QA plans left out' + (qaPlans ? ': ' + qaPlans + ' plan(s)' : '') + ')';
    $('chart-time').dataset.bin = bin;
    RtCharts.bars($('chart-time'), {
      title: 'Patients and plans per ' + BIN_NAMES[bin],
      labels: periods.map(function (p) { return p.Period; }),
      series: [
        { name: 'Patients', color: COLORS.patients, values: periods.map(function (p) { return p.Patients; }) },
        { name: 'Plans', color: COLORS.plans, values: periods.map(function (p) { return p.Plans; }) }
      ],
      emptyText: m && !m.error ? 'No treated plan yet' : '…'
    });
    var intents = charts.PlansByIntent || (m && m.Summary && m.Summary.PlansByIntent) || {};
    RtCharts.hbars($('chart-intent'), {
      title: 'Plans by intent', unit: 'plan(s)',
      items: Object.keys(intents).sort(function (a, b) { return intents[b] - intents[a]; }).map(function (k, i) {
        return { label: k, value: intents[k], color: INTENT_COLORS[i % INTENT_COLORS.length] };
      })
    });
    var statuses = charts.PlansByStatus || (m && m.Summary && m.Summary.PlansByStatus) || {};
    RtCharts.hbars($('chart-status'), {
      title: 'Plans by status', unit: 'plan(s)',
      items: ['Complete', 'Incomplete', 'Missing', 'Invalid'].filter(function (k) { return statuses[k]; })
        .map(function (k) { return { label: k, value: statuses[k], color: STATUS_COLORS[k] }; })
    });
  }

  function fillSelect(select, values) {
    var current = select.value;
    var wanted = [''].concat(values);
    var have = Array.prototype.map.call(select.options, function (o) { return o.value; });
    if (have.join('\n') === wanted.join('\n')) { return; }
    clear(select);
    wanted.forEach(function (v) { select.appendChild(h('option', { value: v, text: v || 'all' })); });
    select.value = wanted.indexOf(current) >= 0 ? current : '';
  }

  function listCell(uids) {
    var td = h('td');
    if (uids && uids.length) {
      td.appendChild(h('span', { title: uids.join('\n'), text: String(uids.length) }));
    }
    return td;
  }

  function renderPlans(m) {
    var tbody = document.querySelector('#plans tbody');
    clear(tbody);
    var plans = (m && m.Plans) || [];
    fillSelect($('f-status'), ['Complete', 'Incomplete', 'Missing', 'Invalid'].filter(function (s) {
      return plans.some(function (p) { return p.Status === s; });
    }));
    var intents = [];
    plans.forEach(function (p) { var i = p.PlanIntent || 'NONE'; if (intents.indexOf(i) < 0) { intents.push(i); } });
    fillSelect($('f-intent'), intents.sort());
    var fs = $('f-status').value, fi = $('f-intent').value, fp = $('f-patient').value.trim().toLowerCase();
    var shown = plans.map(function (p, i) { return { p: p, i: i }; }).filter(function (x) {
      var p = x.p;
      return (!fs || p.Status === fs) && (!fi || (p.PlanIntent || 'NONE') === fi) &&
        (!fp || (p.PatientID || '').toLowerCase().indexOf(fp) >= 0);
    }).sort(function (a, b) {
      return ((STATUS_ORDER[a.p.Status] || 0) - (STATUS_ORDER[b.p.Status] || 0)) || a.i - b.i;
    }).map(function (x) { return x.p; });
    var pages = Math.max(1, Math.ceil(shown.length / PLAN_PAGE));
    state.planPage = Math.min(Math.max(0, state.planPage), pages - 1);
    var first = state.planPage * PLAN_PAGE;
    shown.slice(first, first + PLAN_PAGE).forEach(function (p) {
      var regs = (p.RegistrationUIDs || []).map(function (u) { return (p.RegistrationTypes || {})[u] || '?'; });
      var missing = h('td', { className: 'missing-item' });
      if (p.Status === 'Invalid') { missing.appendChild(h('div', { className: 'invalid-reason', text: p.InvalidReason || 'invalid plan' })); }
      (p.Missing || []).forEach(function (x) {
        missing.appendChild(h('div', { title: x.UID }, [h('b', { text: x.What }), ' ', uidCell(x.UID), ': ' + x.Reason]));
      });
      tbody.appendChild(h('tr', { 'data-status': p.Status }, [
        h('td', { className: 'uid-text', text: p.PatientID || '' }),
        h('td', {}, [h('div', { text: p.PlanLabel || '(no label)' }), uidCell(p.PlanUID)]),
        h('td', { text: p.PlanIntent || '' }),
        h('td', {}, [chip(p.Status)]),
        missing,  // next to the status: what a Missing/Incomplete/Invalid plan lacks stays in view
        h('td', { text: String(p.Treatments || 0) }),
        dateCell(p.FirstTreatment),
        dateCell(p.LastTreatment),
        h('td', {}, [uidCell(p.StructureSetUID)]),
        listCell(p.DoseUIDs),
        listCell(p.PlanningSeriesUIDs),
        h('td', { title: (p.RegistrationUIDs || []).join('\n'), text: regs.join(', ') }),
        listCell(p.RegisteredSeriesUIDs)
      ]));
    });
    $('plans-count').textContent = m && !m.error ? '(' + shown.length + ' of ' + plans.length + ')' : '';
    $('plans-pager').hidden = pages < 2;
    $('plans-page').textContent = shown.length ? 'plans ' + (first + 1) + '–' + Math.min(first + PLAN_PAGE, shown.length) +
      ' of ' + shown.length + ' · page ' + (state.planPage + 1) + ' of ' + pages : '';
    $('plans-prev').disabled = state.planPage === 0;
    $('plans-next').disabled = state.planPage >= pages - 1;
    var empty = $('plans-empty');
    empty.hidden = shown.length > 0;
    empty.textContent = plans.length ? 'No plan matches the filters.' : (m && !m.error ? 'No treated plan found yet.' : '');
  }

  function renderManifest() {
    var m = state.manifestFor === state.selected ? state.manifest : null;
    renderSummary(m);
    renderCharts(m);
    renderPlans(m);
    $('manifest-age').textContent = state.manifestAt && m && !m.error
      ? 'updated ' + new Date(state.manifestAt).toLocaleTimeString() : '';
  }

  // -- failed jobs and log ---------------------------------------------------------------------------

  function retry(job) {
    api('POST', 'jobs/' + encodeURIComponent(job.ID) + '/retry', {}).then(function (answer) {
      toast('Job ' + answer.ID + ' is ' + answer.State + ' again');
      poll();
    }).catch(function (err) { toast('Retry failed: ' + err.message, true); });
  }

  // A source that answered "no such object" is not asked again: "1/10" would promise nine more attempts.
  function attemptsCell(j) {
    if (/not found at/.test(j.LastError || '')) {
      return h('td', { className: 'not-found', text: 'not found',
        title: 'the source holds no such object: not retried by itself (' + j.Attempts + ' attempt(s)); Retry asks again' });
    }
    return h('td', { text: j.Attempts + '/' + j.MaxAttempts });
  }

  function renderFailed() {
    var tbody = document.querySelector('#failed-jobs tbody');
    clear(tbody);
    state.failed.forEach(function (j) {
      tbody.appendChild(h('tr', {}, [
        h('td', { text: String(j.ID) }), h('td', { text: j.Kind || '' }), h('td', { text: j.Hop || '' }),
        h('td', { text: j.Source || '' }), h('td', {}, [uidCell(j.Target)]),
        attemptsCell(j), h('td', { text: j.DimseStatus || '' }),
        h('td', { text: j.LastError || '' }),
        h('td', {}, [h('button', { type: 'button', text: 'Retry', 'data-job': String(j.ID), onclick: function () { retry(j); } })])
      ]));
    });
    $('failed-count').textContent = state.failed.length ? '(' + state.failed.length + ')' : '';
    $('failed-empty').hidden = state.failed.length > 0;
  }

  function renderLog() {
    var tbody = document.querySelector('#log tbody');
    clear(tbody);
    state.log.forEach(function (e) {
      tbody.appendChild(h('tr', {}, [
        h('td', { text: created(e.Time) }), h('td', { className: 'level-' + e.Level, text: e.Level }),
        h('td', { text: e.Component || '' }), h('td', {}, [e.Harvest ? uidCell(e.Harvest) : null]),
        h('td', { text: e.Message || '' })
      ]));
    });
    $('log-empty').hidden = state.log.length > 0;
  }

  // -- schedules -------------------------------------------------------------------------------------

  function renderSchedules() {
    var tbody = document.querySelector('#schedules tbody');
    clear(tbody);
    state.schedules.forEach(function (sc) {
      var last = (sc.Runs || [])[sc.Runs.length - 1];
      var lastCell = last ? [h('a', { href: '#harvest=' + encodeURIComponent(last.Harvest), text: dicomDate(last.From) + ' – ' + dicomDate(last.To),
        onclick: function (ev) { ev.preventDefault(); select(last.Harvest); } }), ' ', chip(last.State)] : ['never'];
      var actions = sc.Origin === 'api'
        ? [h('button', { type: 'button', text: 'Delete', 'data-schedule': sc.ID, onclick: function () { deleteSchedule(sc.ID); } })]
        : [h('span', { className: 'muted', title: 'defined in orthanc.json (RtHarvest.Schedules)', text: 'orthanc.json' })];
      tbody.appendChild(h('tr', { 'data-id': sc.ID }, [
        h('td', { text: sc.ID }), h('td', { text: (sc.LookupSources || []).join(', ') }),
        h('td', { text: sc.At + ' ' + sc.TimeZone }), h('td', { text: sc.OverlapDays + ' d' }),
        h('td', { text: dicomDate(sc.CoveredTo) || '—' }),
        h('td', { text: created(sc.NextRun), title: sc.Waiting || '' }),
        h('td', {}, lastCell), h('td', { text: sc.Origin }), h('td', {}, actions)
      ]));
    });
    $('schedules-empty').hidden = state.schedules.length > 0;
  }

  function deleteSchedule(id) {
    api('DELETE', 'schedules/' + encodeURIComponent(id)).then(function () {
      toast('Schedule ' + id + ' deleted (its harvests are kept)');
      poll();
    }).catch(function (err) { toast('Not deleted: ' + err.message, true); });
  }

  function submitSchedule(ev) {
    ev.preventDefault();
    var body = { Name: $('ns-name').value.trim(), Source: $('ns-source').value, At: $('ns-at').value,
      TimeZone: $('ns-tz').value.trim(), OverlapDays: parseInt($('ns-overlap').value || '0', 10) };
    var lookup = $('ns-lookup').value.split(/[\s,;]+/).filter(Boolean);
    if (lookup.length) { body.LookupSources = lookup; }
    var from = $('ns-from').value.replace(/-/g, '');
    if (from) { body.From = from; }
    api('POST', 'schedules', body).then(function (answer) {
      toast('Schedule ' + answer.ID + ' created: next run ' + created(answer.NextRun) + ' UTC');
      $('new-schedule').hidden = true;
      poll();
    }).catch(function (err) { toast('Not created: ' + err.message, true); });
  }

  // What is wrong and where (the status route's Health: store index, storage, sources, threads), and how
  // many jobs wait for it; empty when all is well.
  function statusBanner(s) {
    if (!s) { return ''; }
    if (s.ConfigurationError) { return 'Configuration error, harvesting disabled: ' + s.ConfigurationError; }
    var health = s.Health || {};
    var parts = (health.Problems || []).slice();
    var waiting = health.JobsWaitingForOutage || {};
    Object.keys(waiting).forEach(function (fault) {
      parts.push(waiting[fault].Jobs + ' job(s) waiting for ' + fault + ' (attempts not counted)');
    });
    return parts.length ? 'Fault: ' + parts.join(' · ') : '';
  }

  function renderStatus() {
    var s = state.status;
    if (!s) { return; }
    var q = s.Queue || {};
    var text = 'plugin ' + (s.PluginVersion || '?') + ' · Orthanc ' + (s.OrthancVersion || '?') +
      ' · workers ' + (s.WorkersAlive !== undefined ? s.WorkersAlive : '?') + '/' + (s.Workers || '?') +
      ' · queue: ' + ['pending', 'leased', 'waiting', 'failed'].map(function (k) { return k + ' ' + (q[k] || 0); }).join(', ');
    $('server-status').textContent = text;
    banner(statusBanner(s));
    var sources = s.Sources || [];
    [$('nh-source'), $('ns-source')].forEach(function (sel) {
      if (sel.options.length !== sources.length) {
        clear(sel);
        sources.forEach(function (name) { sel.appendChild(h('option', { value: name, text: name })); });
      }
    });
  }

  // -- polling ---------------------------------------------------------------------------------------

  function poll() {
    if (state.polling) { return Promise.resolve(); }
    state.polling = true;
    var requests = [
      api('GET', 'harvests').then(function (list) { state.harvests = list || []; renderHarvests(); }),
      api('GET', 'status').then(function (s) { state.status = s; renderStatus(); }),
      api('GET', 'log?level=warning&limit=20').then(function (events) { state.log = events || []; renderLog(); }),
      api('GET', 'schedules').then(function (list) { state.schedules = list || []; renderSchedules(); })
    ];
    if (state.selected) {
      var target = state.selected;
      var q = target === '*' ? 'jobs?state=failed&limit=200' : 'jobs?state=failed&limit=200&harvest=' + encodeURIComponent(target);
      requests.push(api('GET', q).then(function (jobs) {
        if (state.selected === target) { state.failed = jobs || []; renderFailed(); }
      }));
    }
    return Promise.all(requests).then(function () {
      banner(statusBanner(state.status));
      loadManifest(false);
    }).catch(function (err) {
      banner('Cannot update from the server: ' + err.message + ' (retrying)');
    }).then(function () { state.polling = false; });
  }

  function loop() {
    poll().then(function () {
      setTimeout(loop, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
    });
  }

  // -- new harvest form ------------------------------------------------------------------------------

  function submitHarvest(ev) {
    ev.preventDefault();
    var body = { Source: $('nh-source').value };
    var lookup = $('nh-lookup').value.split(/[\s,;]+/).filter(Boolean);
    if (lookup.length) { body.LookupSources = lookup; }
    var from = $('nh-from').value.replace(/-/g, ''), to = $('nh-to').value.replace(/-/g, '');
    if (from) { body.From = from; }
    if (to) { body.To = to; }
    var patients = $('nh-patients').value.split(/[\n,;]+/).map(function (s) { return s.trim(); }).filter(Boolean);
    if (patients.length) { body.PatientIDs = patients; }
    if ($('nh-label').value.trim()) { body.Label = $('nh-label').value.trim(); }
    api('POST', 'harvests', body).then(function (answer) {
      toast('Harvest ' + answer.ID + ' started');
      $('new-harvest').hidden = true;
      poll().then(function () { select(answer.ID); });
    }).catch(function (err) { toast('Not started: ' + err.message, true); });
  }

  // -- start -----------------------------------------------------------------------------------------

  function init() {
    $('new-harvest-toggle').addEventListener('click', function () { $('new-harvest').hidden = !$('new-harvest').hidden; });
    $('nh-cancel').addEventListener('click', function () { $('new-harvest').hidden = true; });
    $('new-harvest').addEventListener('submit', submitHarvest);
    $('new-schedule-toggle').addEventListener('click', function () { $('new-schedule').hidden = !$('new-schedule').hidden; });
    $('ns-cancel').addEventListener('click', function () { $('new-schedule').hidden = true; });
    $('new-schedule').addEventListener('submit', submitSchedule);
    try { $('ns-tz').value = Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC'; } catch (e) { $('ns-tz').value = 'UTC'; }
    $('show-store').addEventListener('click', function () { select('*'); });
    $('manifest-refresh').addEventListener('click', function () { loadManifest(true); });
    $('period').addEventListener('change', function () {
      state.period = $('period').value;
      renderCharts(state.manifest);
    });
    var refilter = function () { state.planPage = 0; renderPlans(state.manifest); };
    ['f-status', 'f-intent'].forEach(function (id) { $(id).addEventListener('change', refilter); });
    $('f-patient').addEventListener('input', refilter);
    $('plans-prev').addEventListener('click', function () { state.planPage -= 1; renderPlans(state.manifest); });
    $('plans-next').addEventListener('click', function () { state.planPage += 1; renderPlans(state.manifest); });
    var hash = decodeURIComponent(location.hash || '');
    var first = poll();
    if (hash === '#store') { select('*'); }
    else if (hash.indexOf('#harvest=') === 0) { select(hash.slice(9)); }
    else {
      // Show the newest harvest right away: that is what people open the page for.
      first.then(function () { if (!state.selected && state.harvests.length) { select(state.harvests[0].ID); } });
    }
    first.then(function () { setTimeout(loop, POLL_MS); });
  }

  window.rtharvestPage = { state: state, poll: poll, select: select };
  if (document.readyState === 'loading') { document.addEventListener('DOMContentLoaded', init); } else { init(); }
})();
