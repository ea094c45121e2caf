// Drives the real centrifuge-js SDK for the SDK conformance suite (tests/sdk_conformance.rs).
// tests/sdk/python/driver.py speaks the same line protocol with centrifuge-python.
//
//   node driver.mjs
//
// stdin, one JSON command per line:
//   {"op":"connect","url":"ws://…","token":"…","tokens":["…"]}
//       token: the first connection token ("" for none); tokens: what getToken hands out,
//       one per call (the SDK calls it after a 109 "token expired" and before its ttl ends)
//   {"op":"subscribe","channel":"c"}        a recoverable subscription
//   {"op":"publish","channel":"c","data":…}
//   {"op":"unsubscribe","channel":"c"}
//   {"op":"disconnect"}
//   {"op":"ping"}                            answered {"event":"pong"} (the driver is alive)
// stdout, one JSON event per line:
//   {"event":"get_token","n":1}
//   {"event":"connecting"|"disconnected","code":3001,"reason":"…"}
//   {"event":"connected","client":"…"}
//   {"event":"subscribing"|"unsubscribed","channel":"c","code":…,"reason":"…"}
//   {"event":"subscribed","channel":"c","recoverable":true,"was_recovering":false,"recovered":false}
//   {"event":"publication","channel":"c","offset":1,"data":…}
//   {"event":"published","channel":"c"} | {"event":"publish_failed","channel":"c","code":103,"message":"…"}
//   {"event":"error","scope":"client"|"c","code":…,"message":"…"}
//   {"event":"pong"} | {"event":"driver_error","message":"…"}
// Exits when stdin closes.

import readline from 'node:readline';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const out = (value) => process.stdout.write(JSON.stringify(value) + '\n');
const errorOf = (error) => ({ code: error?.code ?? 0, message: error?.message ?? String(error) });

let client = null;

function connect({ url, token = '', tokens = [] }) {
  let calls = 0;
  const queue = [...tokens];
  client = new Centrifuge(url, {
    websocket: WebSocket,
    name: 'pgfanout-conformance-js',
    token,
    // Quick reconnects keep the suite short; the SDK still backs off with jitter.
    minReconnectDelay: 100,
    maxReconnectDelay: 1000,
    getToken: async () => {
      calls += 1;
      out({ event: 'get_token', n: calls });
      const next = queue.shift();
      if (next === undefined) throw new Error('the test gave no more tokens');
      return next;
    },
  });
  client.on('connecting', (ctx) => out({ event: 'connecting', code: ctx.code, reason: ctx.reason }));
  client.on('connected', (ctx) => out({ event: 'connected', client: ctx.client }));
  client.on('disconnected', (ctx) => out({ event: 'disconnected', code: ctx.code, reason: ctx.reason }));
  client.on('error', (ctx) => out({ event: 'error', scope: 'client', ...errorOf(ctx.error) }));
  client.connect();
}

function subscribe({ channel }) {
  const sub = client.newSubscription(channel, { minResubscribeDelay: 100, maxResubscribeDelay: 1000 });
  sub.on('subscribing', (ctx) => out({ event: 'subscribing', channel, code: ctx.code, reason: ctx.reason }));
  sub.on('subscribed', (ctx) =>
    out({
      event: 'subscribed',
      channel,
      recoverable: ctx.recoverable,
      was_recovering: ctx.wasRecovering,
      recovered: ctx.recovered,
    }),
  );
  sub.on('unsubscribed', (ctx) => out({ event: 'unsubscribed', channel, code: ctx.code, reason: ctx.reason }));
  sub.on('publication', (ctx) => out({ event: 'publication', channel, offset: ctx.offset, data: ctx.data }));
  sub.on('error', (ctx) => out({ event: 'error', scope: channel, ...errorOf(ctx.error) }));
  sub.subscribe();
}

async function publish({ channel, data }) {
  try {
    await client.publish(channel, data);
    out({ event: 'published', channel });
  } catch (error) {
    out({ event: 'publish_failed', channel, ...errorOf(error) });
  }
}

function unsubscribe({ channel }) {
  const sub = client.getSubscription(channel);
  if (!sub) throw new Error(`no subscription to ${channel}`);
  sub.unsubscribe();
  client.removeSubscription(sub);
}

const ops = {
  connect,
  subscribe,
  publish,
  unsubscribe,
  disconnect: () => client.disconnect(),
  ping: () => out({ event: 'pong' }),
};

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  if (!line.trim()) return;
  try {
    const command = JSON.parse(line);
    const op = ops[command.op];
    if (!op) throw new Error(`unknown op ${command.op}`);
    Promise.resolve(op(command)).catch((error) => out({ event: 'driver_error', message: String(error) }));
  } catch (error) {
    out({ event: 'driver_error', message: String(error) });
  }
});
lines.on('close', () => {
  client?.disconnect();
  process.exit(0);
});
