"""A model of kube-proxy's iptables mode: each new TCP connection goes to a pod picked
uniformly at random; bytes are then copied both ways until either side closes.

    python3 -m benchkit.randfwd LISTEN_IP:PORT POD_IP:PORT [POD_IP:PORT …]

(iptables does this in the kernel with `-m statistic --mode random`; this user-space copy adds
a little latency per connection but makes the same choice.)
"""

import asyncio
import random
import signal
import sys


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.close()


async def main(listen, pods):
    rng = random.SystemRandom()

    async def handle(cr, cw):
        host, port = rng.choice(pods)
        try:
            pr, pw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, pw), pipe(pr, cw))
        pw.close()
        cw.close()

    host, port = listen
    server = await asyncio.start_server(handle, host, port, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    asyncio.run(main(addr(sys.argv[1]), [addr(a) for a in sys.argv[2:]]))
