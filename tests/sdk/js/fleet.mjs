// Many real centrifuge-js clients in one Node process, for tests that need thousands of SDK
// clients (tests/rolling_restart.rs). Each client checks its own stream as it arrives.
//
//   node fleet.mjs
//
// stdin, one JSON command per line:
//   {"op":"start","url":"ws://…","clients":1000,"channels":["c0",…],"token":"…","ramp":500}
//       client i subscribes (recoverable) to channels[i % channels.length]; `ramp` clients
//       are started per second
//   {"op":"expect","counts":{"c0":250,…},"timeout_ms":30000}
//       waits until every client has offsets 1..=counts[channel] (or the timeout), then reports
// stdout, one JSON event per line:
//   {"event":"subscribed","clients":1000}      once every client has subscribed the first time
//   {"event":"report", …}                      see report() below
// A publication's data must be {"seq": n} with n equal to its offset (the producer's rule).

import readline from 'node:readline';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const out = (value) => process.stdout.write(JSON.stringify(value) + '\n');
// What the SDK reports when the server asks it to reconnect because it shuts down.
const SHUTDOWN = 3001;
// Examples kept per kind of problem, so a report stays small.
const EXAMPLES = 5;

const clients = [];
const started = Date.now();
let subscribedOnce = 0;
let announced = false;
const badExamples = [];
let target = 0; // clients asked for by `start`

function count(map, key) {
  map[key] = (map[key] ?? 0) + 1;
}

function startClient(index, { url, channels, token }) {
  const channel = channels[index % channels.length];
  const state = {
    channel,
    next: 1, // the offset this client expects next
    duplicates: 0,
    gaps: [],
    badData: 0,
    errors: [],
    reconnectCodes: {},
    resubscribes: { recovered: 0, not_recovered: 0 },
    subscribed: false,
  };
  const client = new Centrifuge(url, {
    websocket: WebSocket,
    name: 'pgfanout-fleet',
    token,
    minReconnectDelay: 200,
    maxReconnectDelay: 2000,
  });
  // The last few events, with their time, for the examples of a problem.
  state.history = [];
  const seen = (event) => {
    state.lastEvent = event;
    state.history.push(`${new Date().toISOString()} ${event}`);
    if (state.history.length > 6) state.history.shift();
  };
  client.on('connecting', (ctx) => {
    // Code 0 is the first connect; 3001 is the drain's reconnect advice.
    if (ctx.code !== 0) count(state.reconnectCodes, ctx.code);
    seen(`connecting ${ctx.code}`);
  });
  const problem = (text) => {
    const after = state.lastEvent;
    seen(`problem ${text}`);
    state.errors.push({ text, at_ms: Date.now() - started, at: new Date().toISOString(), after, history: [...state.history] });
  };
  client.on('error', (ctx) => problem(`client: ${JSON.stringify(ctx.error)}`));
  client.on('disconnected', (ctx) => problem(`disconnected ${ctx.code} ${ctx.reason}`));
  client.on('connected', (ctx) => seen(`connected ${ctx.client}`));

  const sub = client.newSubscription(channel, { minResubscribeDelay: 200, maxResubscribeDelay: 2000 });
  sub.on('subscribed', (ctx) => {
    if (!state.subscribed) {
      state.subscribed = true;
      subscribedOnce += 1;
      if (subscribedOnce === target && !announced) {
        announced = true;
        out({ event: 'subscribed', clients: subscribedOnce });
      }
    } else if (ctx.wasRecovering) {
      state.resubscribes[ctx.recovered ? 'recovered' : 'not_recovered'] += 1;
    }
  });
  sub.on('error', (ctx) => problem(`subscription: ${JSON.stringify(ctx.error)}`));
  sub.on('unsubscribed', (ctx) => problem(`unsubscribed ${ctx.code} ${ctx.reason}`));
  sub.on('publication', (ctx) => {
    const offset = Number(ctx.offset);
    if (ctx.data?.seq !== offset) {
      state.badData += 1;
      if (badExamples.length < EXAMPLES) badExamples.push({ channel, offset, data: ctx.data });
    }
    if (offset < state.next) {
      state.duplicates += 1;
    } else {
      if (offset > state.next) state.gaps.push([state.next, offset - 1]);
      state.next = offset + 1;
    }
  });
  sub.subscribe();
  client.connect();
  clients.push({ client, state });
}

async function start(command) {
  target = command.clients;
  const ramp = Math.max(1, command.ramp ?? 500);
  const batch = Math.max(1, Math.ceil(ramp / 20)); // started every 50 ms
  for (let i = 0; i < command.clients; i += batch) {
    for (let j = i; j < Math.min(i + batch, command.clients); j += 1) startClient(j, command);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function complete(counts) {
  return clients.every(({ state }) => state.next > (counts[state.channel] ?? 0));
}

async function expect({ counts, timeout_ms: timeoutMs = 30000 }) {
  const deadline = Date.now() + timeoutMs;
  while (!complete(counts) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  out(report(counts));
}

// One summary over all clients, with a few examples of each kind of problem.
function report(counts) {
  const totals = {
    event: 'report',
    clients: clients.length,
    complete: 0,
    incomplete: [],
    duplicates: 0,
    gaps: [],
    bad_data: 0,
    bad_examples: badExamples,
    errors: {},
    error_examples: [],
    reconnect_codes: {},
    resubscribes: { recovered: 0, not_recovered: 0 },
  };
  clients.forEach(({ state }, index) => {
    const wanted = counts[state.channel] ?? 0;
    if (state.next === wanted + 1) totals.complete += 1;
    else if (totals.incomplete.length < EXAMPLES)
      totals.incomplete.push({ client: index, channel: state.channel, next: state.next, wanted });
    totals.duplicates += state.duplicates;
    totals.bad_data += state.badData;
    for (const gap of state.gaps)
      if (totals.gaps.length < EXAMPLES) totals.gaps.push({ client: index, channel: state.channel, gap });
    for (const error of state.errors) count(totals.errors, error.text);
    for (const error of state.errors)
      if (totals.error_examples.length < EXAMPLES) totals.error_examples.push({ client: index, ...error });
    for (const [code, n] of Object.entries(state.reconnectCodes))
      totals.reconnect_codes[code] = (totals.reconnect_codes[code] ?? 0) + n;
    totals.resubscribes.recovered += state.resubscribes.recovered;
    totals.resubscribes.not_recovered += state.resubscribes.not_recovered;
  });
  totals.shutdown_code = SHUTDOWN;
  return totals;
}

const ops = { start, expect };
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
  for (const { client } of clients) client.disconnect();
  process.exit(0);
});
