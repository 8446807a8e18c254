/* rtharvest page, exports section: de-identified exports with their progress and verification, and a
 * form to start one. Same conventions as harvests.js: relative URLs, textContent only. */
(function () {
  'use strict';

  var POLL_MS = 3000;
  var BASE = location.pathname.replace(/ui\/?$/, '');

  function $(id) { return document.getElementById(id); }

  function cell(text, title) {
    var td = document.createElement('td');
    td.textContent = text === undefined || text === null ? '' : String(text);
    if (title) { td.title = title; }
    return td;
  }

  function api(method, path, body) {
    var init = { method: method, credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } };
    if (body !== undefined) { init.body = JSON.stringify(body); init.headers['Content-Type'] = 'application/json'; }
    return fetch(location.origin + BASE + path, init).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        if (!resp.ok) { throw new Error((data && data.Error) || (resp.status + ' ' + resp.statusText)); }
        return data;
      });
    });
  }

  function verificationText(v) {
    if (!v) { return ''; }
    if (v.Passed) { return 'passed (' + v.InstancesFound + '/' + v.InstancesExpected + ', ' + v.PlansCompared + ' plans)'; }
    return 'FAILED: ' + v.AbsentCount + ' absent, ' + (v.ManifestDifferences || []).length + ' manifest difference(s), ' +
      v.PhiHitCount + ' PHI hit(s)';
  }

  function render(list) {
    var tbody = document.querySelector('#exports tbody');
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    (list || []).forEach(function (d) {
      var p = d.Progress || {};
      var tr = document.createElement('tr');
      [cell(d.ID), cell(d.State, (d.Errors || []).join('\n')), cell(d.Harvest), cell(d.Destination + ' (' + d.DestinationKind + ')'),
       cell((d.CreatedAt || '').replace('T', ' ').replace('Z', '')),
       cell((p.InstancesSent || 0) + '/' + (p.InstancesTotal || 0)), cell(p.InstancesFailed || 0),
       cell(p.InstancesVerified || 0), cell(verificationText(d.Verification))].forEach(function (td) { tr.appendChild(td); });
      tr.className = 'state-' + d.State;
      tbody.appendChild(tr);
    });
    $('exports-empty').hidden = (list || []).length > 0;
  }

  function poll() {
    return api('GET', 'exports?limit=50').then(render).catch(function () { /* the harvests poll reports outages */ });
  }

  function loadDestinations() {
    api('GET', 'destinations').then(function (doc) {
      var sel = $('ne-destination');
      while (sel.firstChild) { sel.removeChild(sel.firstChild); }
      (doc.Destinations || []).forEach(function (d) {
        var opt = document.createElement('option');
        opt.value = d.Name;
        opt.textContent = d.Name + ' (' + d.Kind + ')';
        // A clinical source (or credentials over plain http) cannot receive exports: shown, not selectable.
        if (d.Allowed === false) {
          opt.disabled = true;
          opt.title = d.Refused || '';
          opt.textContent += ' - refused';
        }
        sel.appendChild(opt);
      });
      var allowed = (doc.Destinations || []).filter(function (d) { return d.Allowed !== false; });
      if (allowed.length) { sel.value = allowed[0].Name; }
    }).catch(function () {});
  }

  function selectedHarvest() {
    var page = window.rtharvestPage;
    return page && page.state.selected && page.state.selected !== '*' ? page.state.selected : '';
  }

  function formError(message) {
    $('ne-error').textContent = message || '';
    $('ne-error').hidden = !message;
  }

  function submit(ev) {
    ev.preventDefault();
    // The Harvest field may stay empty: the placeholder promises the selected harvest.
    var harvest = $('ne-harvest').value.trim() || selectedHarvest();
    if (!harvest) { formError('Choose a harvest: select one in the list above or type its ID.'); return; }
    var body = { Harvest: harvest, Destination: $('ne-destination').value, Plans: $('ne-plans').value,
                 Profile: { Dates: $('ne-dates').value, Descriptors: $('ne-descriptors').value } };
    if ($('ne-label').value.trim()) { body.Label = $('ne-label').value.trim(); }
    formError('');
    api('POST', 'exports', body).then(function () {
      $('new-export').hidden = true;
      poll();
    }).catch(function (err) { formError('Export not started: ' + err.message); });
  }

  function init() {
    $('new-export-toggle').addEventListener('click', function () {
      $('new-export').hidden = !$('new-export').hidden;
      if (!$('new-export').hidden) {
        var selected = selectedHarvest();
        $('ne-harvest').placeholder = selected ? 'default: the selected one, ' + selected : 'harvest ID (none selected)';
        formError('');
        loadDestinations();
      }
    });
    $('ne-cancel').addEventListener('click', function () { $('new-export').hidden = true; });
    $('new-export').addEventListener('submit', submit);
    poll();
    setInterval(function () { if (!document.hidden) { poll(); } }, POLL_MS);
  }

  window.rtharvestExports = { poll: poll };
  if (document.readyState === 'loading') { document.addEventListener('DOMContentLoaded', init); } else { init(); }
})();
