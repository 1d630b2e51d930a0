// Gallery filters and details. The filter state lives in the URL fragment
// (#label=liver&split=test) so it follows the prev/next links; no network, no libraries.
(function () {
  var form = document.querySelector('form.filters');
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  var selects = Array.prototype.slice.call(form.querySelectorAll('select'));
  var shown = document.getElementById('shown');
  var dialog = document.getElementById('details');

  function state() {
    var s = {};
    selects.forEach(function (sel) { if (sel.value) { s[sel.name] = sel.value; } });
    return s;
  }
  function fragment(s) {
    return Object.keys(s).map(function (k) {
      return encodeURIComponent(k) + '=' + encodeURIComponent(s[k]);
    }).join('&');
  }
  function apply() {
    var s = state(), n = 0;
    cards.forEach(function (card) {
      var ok = Object.keys(s).every(function (k) { return card.dataset[k] === s[k]; });
      card.hidden = !ok;
      if (ok) { n += 1; }
    });
    shown.textContent = n + ' of ' + cards.length + ' cards on this page shown';
    var frag = fragment(s);
    history.replaceState(null, '', frag ? '#' + frag : location.pathname);
    document.querySelectorAll('nav a').forEach(function (a) {
      a.href = a.getAttribute('href').split('#')[0] + (frag ? '#' + frag : '');
    });
  }
  function load() {
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      var p = kv.split('=');
      var sel = form.elements[decodeURIComponent(p[0] || '')];
      if (sel && p.length === 2) { sel.value = decodeURIComponent(p[1]); }
    });
    apply();
  }
  function open(card) {
    var body = dialog.querySelector('.body');
    body.replaceChildren(card.querySelector('.pics').cloneNode(true),
                         card.querySelector('.info').cloneNode(true));
    dialog.showModal();
  }

  selects.forEach(function (sel) { sel.addEventListener('change', apply); });
  form.addEventListener('reset', function () { setTimeout(apply, 0); });
  document.querySelectorAll('.legend button').forEach(function (b) {
    b.addEventListener('click', function () { form.elements.label.value = b.dataset.label; apply(); });
  });
  cards.forEach(function (card) {
    card.addEventListener('click', function () { open(card); });
    card.addEventListener('keydown', function (e) { if (e.key === 'Enter') { open(card); } });
  });
  dialog.querySelector('button').addEventListener('click', function () { dialog.close(); });
  dialog.addEventListener('click', function (e) { if (e.target === dialog) { dialog.close(); } });
  load();
})();
