// Drives centrifuge-js through token expiry against a pgfanout node (tests/auth_sdk_js.rs).
//
//   node refresh.mjs <ws-url> <channel> <timeout-ms> <first-token> <next-token>...
//
// The client connects with <first-token>; every call of getToken hands out the next token
// of the list (the SDK calls it after a 109 "token expired" and before its token's ttl ends).
// stdout, one JSON object per line:
//   {"getToken":n}                     the n-th call of getToken
//   {"connected":true,"client":"..."}  each time the client connects
//   {"subscribed":true}                each time the subscription is made
//   {"offset":1,"data":...}            each publication
// stderr: SDK state changes and errors. Exits 0 when killed by the test, 1 on timeout.

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const [url, channel, timeoutArg, first, ...next] = process.argv.slice(2);
const out = (value) => process.stdout.write(JSON.stringify(value) + '\n');

let calls = 0;
const client = new Centrifuge(url, {
  websocket: WebSocket,
  name: 'pgfanout-refresh-test',
  token: first,
  getToken: async () => {
    calls += 1;
    out({ getToken: calls });
    const token = next.shift();
    if (!token) throw new Error('the test gave no more tokens');
    return token;
  },
});
client.on('state', (ctx) => console.error(`client state: ${ctx.oldState} -> ${ctx.newState}`));
client.on('connected', (ctx) => out({ connected: true, client: ctx.client }));
client.on('disconnected', (ctx) => console.error(`disconnected: ${ctx.code} ${ctx.reason}`));
client.on('error', (ctx) => console.error(`client error: ${JSON.stringify(ctx.error)}`));

const sub = client.newSubscription(channel);
sub.on('subscribed', () => out({ subscribed: true }));
sub.on('error', (ctx) => console.error(`subscription error: ${JSON.stringify(ctx.error)}`));
sub.on('publication', (ctx) => out({ offset: ctx.offset, data: ctx.data }));
sub.subscribe();
client.connect();

setTimeout(() => {
  console.error(`timeout after ${timeoutArg} ms`);
  process.exit(1);
}, Number(timeoutArg));
