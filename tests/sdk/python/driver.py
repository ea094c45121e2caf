"""Drives the real centrifuge-python SDK for the SDK conformance suite (tests/sdk_conformance.rs).

Same line protocol as tests/sdk/js/driver.mjs (see its header): JSON commands on stdin
(connect, subscribe, publish, unsubscribe, disconnect, ping), JSON events on stdout. Exits when
stdin closes.
"""

import asyncio
import json
import sys

from centrifuge import (
    Client,
    ClientEventHandler,
    SubscriptionEventHandler,
)


def out(value):
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def error_of(error):
    return {"code": getattr(error, "code", 0) or 0, "message": str(error)}


class ClientEvents(ClientEventHandler):
    async def on_connecting(self, ctx):
        out({"event": "connecting", "code": ctx.code, "reason": ctx.reason})

    async def on_connected(self, ctx):
        out({"event": "connected", "client": ctx.client})

    async def on_disconnected(self, ctx):
        out({"event": "disconnected", "code": ctx.code, "reason": ctx.reason})

    async def on_error(self, ctx):
        out({"event": "error", "scope": "client", **error_of(ctx.error)})


class SubscriptionEvents(SubscriptionEventHandler):
    def __init__(self, channel):
        self.channel = channel

    async def on_subscribing(self, ctx):
        out({"event": "subscribing", "channel": self.channel, "code": ctx.code, "reason": ctx.reason})

    async def on_subscribed(self, ctx):
        out(
            {
                "event": "subscribed",
                "channel": self.channel,
                "recoverable": ctx.recoverable,
                "was_recovering": ctx.was_recovering,
                "recovered": ctx.recovered,
            }
        )

    async def on_unsubscribed(self, ctx):
        out({"event": "unsubscribed", "channel": self.channel, "code": ctx.code, "reason": ctx.reason})

    async def on_publication(self, ctx):
        out({"event": "publication", "channel": self.channel, "offset": ctx.pub.offset, "data": ctx.pub.data})

    async def on_error(self, ctx):
        out({"event": "error", "scope": self.channel, **error_of(ctx.error)})


class Driver:
    def __init__(self):
        self.client = None

    async def connect(self, url, token="", tokens=()):
        queue = list(tokens)
        calls = 0

        async def get_token():
            nonlocal calls
            calls += 1
            out({"event": "get_token", "n": calls})
            if not queue:
                raise RuntimeError("the test gave no more tokens")
            return queue.pop(0)

        self.client = Client(
            url,
            events=ClientEvents(),
            token=token,
            get_token=get_token,
            name="pgfanout-conformance-python",
            # Quick reconnects keep the suite short; the SDK still backs off with jitter.
            min_reconnect_delay=0.1,
            max_reconnect_delay=1.0,
            proxy=None,
        )
        await self.client.connect()

    async def subscribe(self, channel):
        sub = self.client.new_subscription(
            channel,
            events=SubscriptionEvents(channel),
            recoverable=True,
            min_resubscribe_delay=0.1,
            max_resubscribe_delay=1.0,
        )
        await sub.subscribe()

    async def publish(self, channel, data):
        try:
            await self.client.publish(channel, data)
            out({"event": "published", "channel": channel})
        except Exception as error:  # the SDK raises its own error types; report them all
            out({"event": "publish_failed", "channel": channel, **error_of(error)})

    async def unsubscribe(self, channel):
        sub = self.client.get_subscription(channel)
        if sub is None:
            raise RuntimeError(f"no subscription to {channel}")
        await sub.unsubscribe()
        self.client.remove_subscription(sub)

    async def disconnect(self):
        await self.client.disconnect()

    async def ping(self):
        out({"event": "pong"})


async def main():
    driver = Driver()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    while True:
        line = await reader.readline()
        if not line:
            break
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            op = command.pop("op")
            handler = getattr(driver, op, None)
            if handler is None or op.startswith("_"):
                raise RuntimeError(f"unknown op {op}")
        except Exception as error:
            out({"event": "driver_error", "message": str(error)})
            continue

        async def run(handler=handler, command=command):
            try:
                await handler(**command)
            except Exception as error:
                out({"event": "driver_error", "message": repr(error)})

        task = asyncio.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if driver.client is not None:
        await driver.client.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
