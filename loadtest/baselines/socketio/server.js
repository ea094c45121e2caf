// Baseline for BENCHMARKS.md: a Socket.IO server with the Redis adapter, serving the same
// load shape as pgfanout (rooms = channels; POST /api/publish = the HTTP publish API).
// Run two of them on one Redis (scripts/bench.sh --target socketio does):
//   PORT=9000 REDIS_URL=redis://127.0.0.1:6379 API_KEY=... node server.js
// Clients (loadtest with protocol = "socketio") connect over WebSocket only, emit
// `subscribe` with a channel name and an ack, and receive `pub` events.
import http from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const port = Number(process.env.PORT || 9000);
const apiKey = process.env.API_KEY || "";
const pub = createClient({ url: process.env.REDIS_URL || "redis://127.0.0.1:6379" });
const sub = pub.duplicate();
await Promise.all([pub.connect(), sub.connect()]);

let io;
const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/ready") {
    res.writeHead(200).end("ok");
    return;
  }
  if (req.method !== "POST" || req.url !== "/api/publish") {
    res.writeHead(404).end();
    return;
  }
  if (req.headers.authorization !== `apikey ${apiKey}`) {
    res.writeHead(401).end();
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let items;
    try {
      items = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch {
      res.writeHead(400).end();
      return;
    }
    for (const item of Array.isArray(items) ? items : [items]) {
      io.to(item.channel).emit("pub", item.data);
    }
    res.writeHead(200, { "content-type": "application/json" }).end("{}");
  });
});

io = new Server(server, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  adapter: createAdapter(pub, sub),
});
io.on("connection", (socket) => {
  socket.on("subscribe", (channel, ack) => {
    socket.join(String(channel));
    if (typeof ack === "function") ack("ok");
  });
});

server.listen(port, "127.0.0.1", () => console.log(`socket.io baseline on :${port}`));
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
