"""An asyncio HTTP/1.1 client: one connection per request (as separate clients would), with
send and completion times on one clock (time.monotonic)."""

import asyncio
import time


class Result:
    __slots__ = ("sent", "done", "status", "error", "service_ms")

    def __init__(self, service_ms):
        self.sent = self.done = None
        self.status = 0
        self.error = None
        self.service_ms = service_ms

    @property
    def latency(self):
        return self.done - self.sent


def request_bytes(host, path):
    return f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode()


async def read_status(reader):
    """Reads a whole Connection: close response; returns its status code."""
    data = await reader.read()  # until EOF
    if not data:
        raise ConnectionError("connection closed without a response")
    return int(data.split(b" ", 2)[1])


async def one(host, port, path, res, timeout, connect_gate=None):
    """Sends one request and waits for the whole response, filling `res`."""
    writer = None
    try:
        if connect_gate is not None:
            async with connect_gate:
                reader, writer = await asyncio.open_connection(host, port)
                res.sent = time.monotonic()
                writer.write(request_bytes(host, path))
                await writer.drain()
        else:
            res.sent = time.monotonic()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request_bytes(host, path))
            await writer.drain()
        res.status = await asyncio.wait_for(read_status(reader), timeout)
    except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
        res.error = f"{type(e).__name__}: {e}"
        if res.sent is None:
            res.sent = time.monotonic()
    finally:
        res.done = time.monotonic()
        if writer is not None:
            writer.close()


async def run_schedule(host, port, schedule, timeout):
    """`schedule`: [(offset_s, service_ms)]. Each request is sent at start + offset_s.
    Returns (start, [Result])."""
    start = time.monotonic() + 0.05
    results = [Result(ms) for _, ms in schedule]

    async def at(offset, ms, res):
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await one(host, port, f"/work?ms={ms}", res, timeout)

    await asyncio.gather(*(at(o, ms, r) for (o, ms), r in zip(schedule, results)))
    return start, results
