// The page: one map subscription, rendered as a table of its keys.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const channel = new URLSearchParams(location.search).get('channel') || 'demo';
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const client = new Centrifuge(`${scheme}//${location.host}/connection/websocket`);
  const sub = client.newMapSubscription(channel);
  const entries = new Map(); // key -> {data, offset}

  $('channel').textContent = channel;
  document.title = `${channel} · pgstore map channel`;

  function setStatus(state, text) {
    document.body.dataset.state = state;
    const el = $('status');
    el.textContent = text;
    el.className = 'status' + (state === 'subscribed' ? ' live' : state === 'offline' ? ' offline' : '');
  }

  function pretty(data) {
    return data === undefined ? '' : JSON.stringify(data, null, 2);
  }

  function rowOf(key) {
    for (const tr of $('keys').children) {
      if (tr.dataset.key === key) return tr;
    }
    return null;
  }

  function render(key, flash) {
    const e = entries.get(key);
    let tr = rowOf(key);
    if (!e) {
      if (tr) tr.remove();
      counted();
      return;
    }
    if (!tr) {
      tr = document.createElement('tr');
      tr.dataset.key = key;
      const cells = ['key', 'value', 'offset', 'actions'].map((name) => {
        const td = document.createElement('td');
        td.className = name;
        tr.appendChild(td);
        return td;
      });
      cells[0].textContent = key;
      cells[1].appendChild(document.createElement('pre')).className = 'value';
      const remove = cells[3].appendChild(document.createElement('button'));
      remove.className = 'danger remove';
      remove.type = 'button';
      remove.textContent = 'Remove';
      remove.addEventListener('click', () => {
        $('keys-error').textContent = '';
        sub.remove(key).catch((err) => { $('keys-error').textContent = `Not removed: ${describe(err)}`; });
      });
      // Keep the rows in key order.
      let before = null;
      for (const other of $('keys').children) {
        if (other.dataset.key > key) { before = other; break; }
      }
      $('keys').insertBefore(tr, before);
    }
    tr.dataset.offset = String(e.offset);
    tr.querySelector('pre.value').textContent = pretty(e.data);
    tr.querySelector('td.offset').textContent = String(e.offset);
    if (flash) {
      tr.classList.remove('flash');
      void tr.offsetWidth; // restart the animation
      tr.classList.add('flash');
    }
    counted();
  }

  function counted() {
    const n = entries.size;
    $('count').textContent = n ? `(${n})` : '';
    $('empty').hidden = n > 0;
  }

  function describe(err) {
    if (err && err.message) return err.code ? `${err.message} (${err.code})` : err.message;
    return String(err);
  }

  let epoch = '';
  function position(offset, newEpoch) {
    if (newEpoch !== undefined) epoch = newEpoch;
    $('position').textContent = `${offset} · epoch ${epoch || '–'}`;
  }

  $('keys').addEventListener('animationend', (ev) => ev.target.closest('tr')?.classList.remove('flash'));

  sub.on('sync', (ctx) => {
    entries.clear();
    $('keys').replaceChildren();
    for (const e of ctx.entries) entries.set(e.key, { data: e.data, offset: e.offset || 0 });
    for (const key of entries.keys()) render(key, false);
    counted();
  });
  sub.on('update', (ctx) => {
    if (ctx.removed) entries.delete(ctx.key);
    else entries.set(ctx.key, { data: ctx.data, offset: ctx.offset || 0 });
    render(ctx.key, true);
    if (ctx.offset) position(ctx.offset);
  });
  sub.on('subscribing', () => setStatus('subscribing', 'subscribing'));
  sub.on('subscribed', (ctx) => {
    const sp = ctx.streamPosition;
    if (sp) position(sp.offset || 0, sp.epoch);
    setStatus('subscribed', ctx.wasRecovering ? (ctx.recovered ? 'live · recovered' : 'live · reloaded') : 'live');
  });
  sub.on('unsubscribed', (ctx) => setStatus('offline', `unsubscribed: ${ctx.reason}`));
  sub.on('error', (ctx) => { $('keys-error').textContent = describe(ctx.error); });
  client.on('connected', (ctx) => {
    const who = ctx.data || {};
    $('node').textContent = who.node || '–';
    $('user').textContent = who.user || '–';
  });
  client.on('disconnected', (ctx) => setStatus('offline', `disconnected: ${ctx.reason}`));
  client.on('connecting', () => setStatus('connecting', 'connecting'));

  $('set-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('key').value;
    let value;
    try {
      value = JSON.parse($('value').value);
    } catch (err) {
      $('set-error').textContent = `The value is not JSON: ${err.message}`;
      return;
    }
    $('set-error').textContent = '';
    $('set').disabled = true;
    sub.publish(key, value).then(() => {
      $('key').value = '';
      $('value').value = '';
    }, (err) => {
      $('set-error').textContent = `Not set: ${describe(err)}`;
    }).finally(() => { $('set').disabled = false; });
  });

  counted();
  sub.subscribe();
  client.connect();
})();
