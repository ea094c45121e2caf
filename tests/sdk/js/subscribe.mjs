// Watches a channel with the real centrifuge-js SDK (the command scripts/run-cluster.sh prints).
//
//   node subscribe.mjs <ws-url> <channel> <count> <timeout-ms>
//
// stdout, one JSON object per line:
//   {"subscribed":true,"channel":"..."}   once the subscribe reply arrived
//   {"offset":1,"data":{...}}             for each publication, in arrival order
// stderr: SDK state changes and errors, for the test's failure message.
// Exit status: 0 after <count> publications, 1 on timeout, 2 on an SDK error.

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const [url, channel, countArg, timeoutArg] = process.argv.slice(2);
if (!url || !channel) {
  console.error('usage: node subscribe.mjs <ws-url> <channel> [count=1] [timeout-ms=15000]');
  process.exit(2);
}
const wanted = Number(countArg ?? 1);
const timeoutMs = Number(timeoutArg ?? 15000);

// Node 20 has no global WebSocket: hand the SDK the `ws` implementation.
const client = new Centrifuge(url, { websocket: WebSocket, name: 'pgfanout-sdk-test' });

let done = false;
function finish(code, why) {
  if (done) return;
  done = true;
  if (why) console.error(why);
  client.disconnect();
  // Let stdout drain before exiting.
  process.stdout.write('', () => process.exit(code));
}

const timer = setTimeout(
  () => finish(1, `timeout after ${timeoutMs} ms: ${received}/${wanted} publications`),
  timeoutMs,
);

let received = 0;
client.on('state', (ctx) => console.error(`client state: ${ctx.oldState} -> ${ctx.newState}`));
client.on('disconnected', (ctx) => console.error(`disconnected: ${ctx.code} ${ctx.reason}`));
client.on('error', (ctx) => console.error(`client error: ${JSON.stringify(ctx.error)}`));

const sub = client.newSubscription(channel);
sub.on('subscribed', () => {
  process.stdout.write(JSON.stringify({ subscribed: true, channel }) + '\n');
});
sub.on('error', (ctx) => console.error(`subscription error: ${JSON.stringify(ctx.error)}`));
sub.on('unsubscribed', (ctx) => {
  clearTimeout(timer);
  finish(2, `unsubscribed: ${ctx.code} ${ctx.reason}`);
});
sub.on('publication', (ctx) => {
  received += 1;
  process.stdout.write(JSON.stringify({ offset: ctx.offset, data: ctx.data }) + '\n');
  if (received >= wanted) {
    clearTimeout(timer);
    finish(0);
  }
});

sub.subscribe();
client.connect();
