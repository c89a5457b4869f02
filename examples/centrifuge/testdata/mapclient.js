// mapclient.js drives centrifuge-js clients for the tests: the bundle the
// page uses (web/vendor/centrifuge.js), run by node with its WebSocket
//
//	node --experimental-websocket testdata/mapclient.js
//
// It reads commands from stdin and writes events to stdout, one JSON object
// a line each:
//
//	{"op":"connect","client":"c1","url":"ws://…/connection/websocket"}  (again: reconnect)
//	{"op":"disconnect","client":"c1"}
//	{"op":"subscribe","client":"c1","channel":"ch","quiet":false,"expect":0}
//	{"op":"stream","client":"c1","channel":"ch"}  (an ordinary subscription)
//	{"op":"publish","client":"c1","channel":"ch","key":"k","data":{…},"ref":"r1"}
//	{"op":"report","client":"c1","channel":"ch"}
//
// Events: ready; connected, disconnected {client, code, reason}; subscribed {client,
// channel, wasRecovering, recovered, offset, epoch}; sync {client, channel,
// entries: [{key, offset, data}]}; update {client, channel, key, offset,
// removed, data}; published {ref, error}; error {client, channel, error};
// report {client, channel, offsets, latencies}.
//
// A quiet subscription keeps its updates instead of writing them: report
// returns their offsets and, for data holding {"t": <Unix microseconds>},
// how long after t each arrived, in microseconds; with expect, it says
// complete {client, channel} once it has kept that many.
'use strict';

const path = require('path');
const readline = require('readline');

if (typeof WebSocket === 'undefined') {
  process.stderr.write('mapclient.js: no WebSocket: run node (20 or later) with --experimental-websocket\n');
  process.exit(2);
}
require(path.join(__dirname, '..', 'web', 'vendor', 'centrifuge.js'));
const { Centrifuge } = globalThis;

function emit(ev) {
  process.stdout.write(JSON.stringify(ev) + '\n');
}

function nowMicros() {
  return (performance.timeOrigin + performance.now()) * 1000;
}

const clients = new Map(); // name -> {c, subs: Map(channel -> {sub, offsets, latencies})}

function clientOf(name) {
  const cl = clients.get(name);
  if (!cl) throw new Error(`no client ${name}`);
  return cl;
}

function subscribe(name, cl, channel, quiet, expect) {
  const rec = { offsets: [], latencies: [] };
  const sub = cl.c.newMapSubscription(channel);
  rec.sub = sub;
  cl.subs.set(channel, rec);
  sub.on('subscribed', (ctx) => emit({
    ev: 'subscribed', client: name, channel,
    wasRecovering: ctx.wasRecovering, recovered: ctx.recovered,
    offset: ctx.streamPosition ? ctx.streamPosition.offset || 0 : 0,
    epoch: ctx.streamPosition ? ctx.streamPosition.epoch || '' : '',
  }));
  sub.on('sync', (ctx) => emit({
    ev: 'sync', client: name, channel,
    entries: ctx.entries.map((e) => ({ key: e.key, offset: e.offset || 0, data: e.data })),
  }));
  sub.on('update', (ctx) => {
    if (quiet) {
      rec.offsets.push(ctx.offset || 0);
      const t = ctx.data && ctx.data.t;
      rec.latencies.push(typeof t === 'number' ? Math.round(nowMicros() - t) : -1);
      if (rec.offsets.length === expect) emit({ ev: 'complete', client: name, channel });
      return;
    }
    emit({ ev: 'update', client: name, channel, key: ctx.key, offset: ctx.offset || 0, removed: !!ctx.removed, data: ctx.data });
  });
  sub.on('error', (ctx) => emit({ ev: 'error', client: name, channel, error: String(ctx.error && ctx.error.message || ctx.error) }));
  sub.on('unsubscribed', (ctx) => emit({ ev: 'unsubscribed', client: name, channel, code: ctx.code, reason: ctx.reason }));
  sub.subscribe();
}

function handle(cmd) {
  switch (cmd.op) {
    case 'connect': {
      let cl = clients.get(cmd.client);
      if (!cl) {
        const c = new Centrifuge(cmd.url, { minReconnectDelay: 50, maxReconnectDelay: 500 });
        cl = { c, subs: new Map() };
        clients.set(cmd.client, cl);
        c.on('connected', () => emit({ ev: 'connected', client: cmd.client }));
        c.on('disconnected', (ctx) => emit({ ev: 'disconnected', client: cmd.client, code: ctx.code, reason: ctx.reason }));
        c.on('error', (ctx) => emit({ ev: 'error', client: cmd.client, error: String(ctx.error && ctx.error.message || ctx.error) }));
      }
      cl.c.connect();
      return;
    }
    case 'disconnect':
      clientOf(cmd.client).c.disconnect();
      return;
    case 'subscribe':
      subscribe(cmd.client, clientOf(cmd.client), cmd.channel, !!cmd.quiet, cmd.expect || 0);
      return;
    case 'stream': {
      // An ordinary (stream) subscription, which the server refuses.
      const sub = clientOf(cmd.client).c.newSubscription(cmd.channel);
      sub.on('error', (ctx) => emit({ ev: 'error', client: cmd.client, channel: cmd.channel, error: String(ctx.error && ctx.error.message || ctx.error) }));
      sub.on('unsubscribed', (ctx) => emit({ ev: 'unsubscribed', client: cmd.client, channel: cmd.channel, code: ctx.code, reason: ctx.reason }));
      sub.subscribe();
      return;
    }
    case 'publish': {
      const rec = clientOf(cmd.client).subs.get(cmd.channel);
      const done = rec ? rec.sub.publish(cmd.key, cmd.data) : clientOf(cmd.client).c.mapPublish(cmd.channel, cmd.key, cmd.data);
      done.then(() => emit({ ev: 'published', ref: cmd.ref }), (err) => emit({ ev: 'published', ref: cmd.ref, error: String(err && err.message || err) }));
      return;
    }
    case 'report': {
      const rec = clientOf(cmd.client).subs.get(cmd.channel);
      emit({ ev: 'report', client: cmd.client, channel: cmd.channel, offsets: rec.offsets, latencies: rec.latencies });
      return;
    }
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  if (!line.trim()) return;
  try {
    handle(JSON.parse(line));
  } catch (err) {
    emit({ ev: 'error', error: `command ${line}: ${err.message}` });
  }
});
rl.on('close', () => {
  for (const cl of clients.values()) cl.c.disconnect();
  process.exit(0);
});
emit({ ev: 'ready' });
