/* rtharvest extension of Orthanc Explorer (jQuery 1.7 + jQuery Mobile, Orthanc 1.10).
 *
 * Home page: a button to the harvests page. Study page: the harvest provenance of the study's series
 * (metadata HarvestId, HarvestSource, HarvestJob, HarvestHop, HarvestedAt written by the plugin on every
 * harvested instance), read from the first instance of each series with /instances/{id}/metadata?expand.
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
      var rows = series.map(function (s) { return { name: describe(s), metadata: null, error: null }; });
      var pending = series.length;
      if (!pending) { render(list, rows); return; }
      series.forEach(function (s, i) {
        var first = (s.Instances || [])[0];
        if (!first) { rows[i].error = 'empty series'; if (--pending === 0) { render(list, rows); } return; }
        $.ajax({ url: '../instances/' + first + '/metadata?expand', dataType: 'json', cache: false })
          .done(function (md) { rows[i].metadata = md; })
          .fail(function (xhr) { rows[i].error = 'metadata unavailable (' + xhr.status + ')'; })
          .always(function () {
            if (--pending === 0 && $.mobile.pageData && $.mobile.pageData.uuid === uuid) { render(list, rows); }
          });
      });
    }).fail(function (xhr) {
      render(list, [{ name: 'Provenance unavailable', metadata: null, error: 'HTTP ' + xhr.status }]);
    });
  });
})();
