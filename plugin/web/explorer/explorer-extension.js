/* rtharvest extension of Orthanc Explorer (jQuery 1.7 + jQuery Mobile, Orthanc 1.10).
 *
 * Home page: a button to the harvests page. Study page: the harvest provenance of the study's series
 * (metadata HarvestId, HarvestSource, HarvestJob, HarvestHop, HarvestedAt). The plugin writes it where it is
 * uniform: on the series when the whole series came by one job and hop, else on each instance (an
 * instance's own values win over its series'). So each series is read with /series/{id}/metadata?expand,
 * and a series without provenance of its own falls back to its first instance's /instances/{id}/metadata.
 * Orthanc concatenates every plugin's extension into one /plugins/explorer.js: this one is wrapped in a
 * function, defines no globals and fails silently rather than breaking the other extensions. */
(function () {
  'use strict';
  if (typeof window.jQuery === 'undefined' || !window.jQuery.mobile) { return; }
  var $ = window.jQuery;
  var UI = '../rtharvest/ui';
  var MAX_SERIES = 50;

  $('#lookup').live('pagebeforecreate', function () {
    if ($('#rtharvest-link').length) { return; }
    // data-ajax=false: the harvests page is a separate document, not a jQuery Mobile page.
    $('<a>')
      .attr({ id: 'rtharvest-link', href: UI, 'data-role': 'button', 'data-icon': 'grid', 'data-theme': 'b',
              'data-ajax': 'false', rel: 'external' })
      .text('RT harvests (rtharvest)')
      .prependTo($('#lookup').find('div[data-role="content"]').first());
  });

  function line(label, value) {
    return $('<p>').append($('<strong>').text(label + ': ')).append(document.createTextNode(value || '–'));
  }

  function describe(series) {
    var tags = series.MainDicomTags || {};
    return [tags.Modality, tags.SeriesDescription || tags.SeriesNumber || series.ID].filter(Boolean).join(' ');
  }

  function render(list, rows) {
    list.find('li.rtharvest-item').remove();
    if (!rows.length) {
      list.append($('<li>').addClass('rtharvest-item').text('No series.'));
    }
    rows.forEach(function (r) {
      var li = $('<li>').addClass('rtharvest-item');
      var md = r.metadata || {};
      if (!md.HarvestId) {
        li.append($('<h3>').text(r.name)).append($('<p>').text(r.error ? r.error : 'not harvested by rtharvest'));
      } else {
        var a = $('<a>').attr({ href: UI + '#harvest=' + encodeURIComponent(md.HarvestId), 'data-ajax': 'false',
                                rel: 'external' });
        a.append($('<h3>').text(r.name));
        a.append(line('Harvest', md.HarvestId));
        a.append(line('Source', md.HarvestSource));
        a.append(line('Hop', md.HarvestHop));
        a.append(line('Job', md.HarvestJob));
        a.append(line('Harvested at', md.HarvestedAt));
        if (r.perInstance) { a.append($('<p>').text('first instance shown; this series\' instances carry their own')); }
        li.append(a);
      }
      list.append(li);
    });
    list.listview('refresh');
  }

  $('#study').live('pagebeforeshow', function () {
    var pageData = $.mobile.pageData;
    if (!pageData || !pageData.uuid) { return; }
    var uuid = pageData.uuid;
    $('#rtharvest-provenance').remove();
    var list = $('<ul>').attr({ id: 'rtharvest-provenance', 'data-role': 'listview', 'data-inset': 'true',
                                'data-theme': 'd', 'data-divider-theme': 'c' });
    list.append($('<li>').attr('data-role', 'list-divider').text('Harvest provenance'));
    list.append($('<li>').addClass('rtharvest-item').text('Loading…'));
    var anchor = $('#study-access');
    if (anchor.length) { list.insertAfter(anchor); } else { list.appendTo($('#study div[data-role="content"]').first()); }
    list.listview();
    $.ajax({ url: '../studies/' + uuid + '/series', dataType: 'json', cache: false }).done(function (series) {
      series = (series || []).slice(0, MAX_SERIES);
      var rows = series.map(function (s) { return { name: describe(s), metadata: null, error: null, perInstance: false }; });
      var pending = series.length;
      if (!pending) { render(list, rows); return; }
      function done() {
        if (--pending === 0 && $.mobile.pageData && $.mobile.pageData.uuid === uuid) { render(list, rows); }
      }
      function fail(i) { return function (xhr) { rows[i].error = 'metadata unavailable (' + xhr.status + ')'; }; }
      series.forEach(function (s, i) {
        $.ajax({ url: '../series/' + s.ID + '/metadata?expand', dataType: 'json', cache: false })
          .done(function (md) {
            if (md && md.HarvestId) { rows[i].metadata = md; done(); return; }
            // Instances of this series came by different jobs or hops: each carries its own values.
            var first = (s.Instances || [])[0];
            if (!first) { rows[i].error = 'empty series'; done(); return; }
            $.ajax({ url: '../instances/' + first + '/metadata?expand', dataType: 'json', cache: false })
              .done(function (own) { rows[i].metadata = own; rows[i].perInstance = true; })
              .fail(fail(i))
              .always(done);
          })
          .fail(function (xhr) { fail(i)(xhr); done(); });
      });
    }).fail(function (xhr) {
      render(list, [{ name: 'Provenance unavailable', metadata: null, error: 'HTTP ' + xhr.status }]);
    });
  });
})();
