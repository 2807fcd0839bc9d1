"""Scenario 3, queue scale: N requests waiting on a full pool, then the drain.

4 pods × limit 4 (16 slots). 16 "blocker" requests of HOLD_MS hold every slot; then N
clients open a connection each (and RSS is read with N idle connections), then each sends a
request of 0 ms, which must all wait in the balancer's queue (`max_waiting` above N, queue
timeout far above the test). Once the balancer reports all N queued, we measure for IDLE_S s:

* memory: RSS of the balancer after the queue filled, minus its RSS before (after a warm-up),
  divided by N; the same with the N connections open but idle splits that into the cost of a
  connection and of a queued request. Kernel socket buffers are not in RSS (they are the same
  for every balancer);
* idle CPU: CPU seconds the balancer used during the window, as a share of one core (and the
  same over IDLE_S s with nothing queued, before the test, for comparison).

The bare Pingora proxy (examples/bare_pingora.rs, one fixed peer, no queue) is run for the
connection part only: its RSS with N idle connections open is what Pingora itself costs per
connection, so lb-agent's memory per queued request splits into Pingora's idle connection, what
lb-agent adds to an idle connection, and what a queued request adds on top of its connection.

When the blockers finish the 16 slots free and the queue drains; drain time is from the first
blocker's response to the last queued response. NGINX OSS and the random model have no queue
and are not run here.

REPS repetitions (BENCH_QUEUE_REPS), each running lb-agent, HAProxy and bare Pingora (a fresh
process each) in turn, the order reversed every other repetition so that none always runs
first or after the same neighbour; every repetition is recorded, median and range reported.
"""

import asyncio
import os
import time

from . import contenders as C
from .client import Result, one, read_status, request_bytes
from .procs import BenchError, cpu_seconds, rss_kib
from .stats import median

PODS, LIMIT = 4, 4
SLOTS = PODS * LIMIT
N = int(os.environ.get("BENCH_QUEUE_N", "10000"))
HOLD_MS = int(os.environ.get("BENCH_QUEUE_HOLD_MS", "25000"))
IDLE_S = 5
REPS = int(os.environ.get("BENCH_QUEUE_REPS", "3"))
# "pingora" is bare Pingora, run for the idle connections only (idle_connections).
ORDER = ["lb-agent", "haproxy", "pingora"]


async def poll(pred, timeout, what, every=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = await asyncio.to_thread(pred)
        if v:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"queue: timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


async def scenario(c, pods, log):
    host, port = c.entry
    pid = c.proc.pid
    warm = [Result(0) for _ in range(200)]
    gate = asyncio.Semaphore(16)
    await asyncio.gather(*(one(host, port, "/warm?ms=0", r, 10, gate) for r in warm))
    if any(r.status != 200 for r in warm):
        raise BenchError(f"queue: warm-up through {c.name} failed: "
                         f"{[r.error or r.status for r in warm if r.status != 200][:3]}")
    await asyncio.sleep(1)
    await asyncio.to_thread(pods.reset)
    rss0 = rss_kib(pid)
    # The same window with nothing queued: the balancer's own idle cost, for comparison.
    cpu_e0, te0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(IDLE_S)
    empty_share = (cpu_seconds(pid) - cpu_e0) / (time.monotonic() - te0)

    blockers = [Result(HOLD_MS) for _ in range(SLOTS)]
    t_block = time.monotonic()
    btasks = [asyncio.create_task(one(host, port, f"/block?ms={HOLD_MS}", r, HOLD_MS / 1000 + 120))
              for r in blockers]
    await poll(lambda: sum(s["inflight"] for s in pods.stats()) == SLOTS, 10,
               "the blockers to hold every slot")

    # First N idle connections (accepted, nothing sent): what a connection alone costs.
    gate = asyncio.Semaphore(256)

    async def connect():
        async with gate:
            return await asyncio.open_connection(host, port)

    try:
        conns = await asyncio.gather(*(connect() for _ in range(N)))
    except OSError as e:
        raise BenchError(f"queue: cannot open {N} connections to {c.name}: {e}")
    await asyncio.sleep(1)
    rss_idle = rss_kib(pid)

    # Then a request on each: all of them wait in the queue.
    queued = [Result(0) for _ in range(N)]
    req = request_bytes(host, "/q?ms=0")
    t_send = time.monotonic()
    for (_, w), r in zip(conns, queued):
        r.sent = time.monotonic()
        w.write(req)

    async def finish(reader, writer, r):
        try:
            r.status = await asyncio.wait_for(read_status(reader), 600)
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
            r.error = f"{type(e).__name__}: {e}"
        finally:
            r.done = time.monotonic()
            writer.close()

    qtasks = [asyncio.create_task(finish(rd, w, r)) for (rd, w), r in zip(conns, queued)]
    await poll(lambda: c.queue_depth() >= N, 120, f"{N} requests in {c.name}'s queue", 0.2)
    t_full = time.monotonic()
    await asyncio.sleep(1)
    rss1 = rss_kib(pid)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(IDLE_S)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    rss2 = rss_kib(pid)
    depth = await asyncio.to_thread(c.queue_depth)
    if depth < N or t1 > t_block + HOLD_MS / 1000:
        raise BenchError(
            f"queue: the slots freed before the idle window ended (queue depth {depth}); "
            f"raise BENCH_QUEUE_HOLD_MS (now {HOLD_MS})")
    log(f"queue {c.name}: {N} queued {t_full - t_send:.1f} s after sending; RSS {rss0} KiB → "
        f"{rss_idle} KiB with {N} idle connections → {rss1} KiB with them queued; idle CPU "
        f"{cpu1 - cpu0:.3f} s in {t1 - t0:.1f} s")

    await asyncio.gather(*btasks)
    await asyncio.gather(*qtasks)
    t_free = min(r.done for r in blockers)
    t_drained = max(r.done for r in queued)
    stats = await asyncio.to_thread(pods.stats)
    statuses = {}
    for r in queued + blockers:
        key = r.error.split(":")[0] if r.error else str(r.status)
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "queued": N,
        "fill_s": t_full - t_send,
        "rss_before_kib": rss0,
        "rss_idle_conns_kib": rss_idle,
        "kib_per_idle_connection": (rss_idle - rss0) / N,
        "rss_queued_kib": rss1,
        "rss_queued_end_kib": rss2,
        "kib_per_queued_request": (rss1 - rss0) / N,
        # What the request adds once its connection is there (the rest is the connection).
        "kib_queued_over_idle": (rss1 - rss_idle) / N,
        "idle_cpu_s": cpu1 - cpu0,
        "idle_window_s": t1 - t0,
        "idle_core_share": (cpu1 - cpu0) / (t1 - t0),
        "empty_idle_core_share": empty_share,
        "drain_s": t_drained - t_free,
        "drain_rps": N / (t_drained - t_free),
        "statuses": statuses,
        "failed": sum(v for k, v in statuses.items() if k != "200"),
        "max_inflight": [s["max_inflight"] for s in stats],
        "cap_violations": sum(1 for s in stats if s["max_inflight"] > LIMIT),
    }


async def idle_connections(c):
    """RSS of `c` before and with N idle connections open (accepted, nothing sent), after the
    same warm-up as `scenario`: the cost of a connection alone, for a proxy without a queue."""
    host, port = c.entry
    warm = [Result(0) for _ in range(200)]
    gate = asyncio.Semaphore(16)
    await asyncio.gather(*(one(host, port, "/warm?ms=0", r, 10, gate) for r in warm))
    if any(r.status != 200 for r in warm):
        raise BenchError(f"queue: warm-up through {c.name} failed: "
                         f"{[r.error or r.status for r in warm if r.status != 200][:3]}")
    await asyncio.sleep(1)
    rss0 = rss_kib(c.proc.pid)
    gate = asyncio.Semaphore(256)

    async def connect():
        async with gate:
            return await asyncio.open_connection(host, port)

    try:
        conns = await asyncio.gather(*(connect() for _ in range(N)))
    except OSError as e:
        raise BenchError(f"queue: cannot open {N} connections to {c.name}: {e}")
    await asyncio.sleep(1)
    rss_idle = rss_kib(c.proc.pid)
    for _, w in conns:
        w.close()
    return {"connections": N, "rss_before_kib": rss0, "rss_idle_conns_kib": rss_idle,
            "kib_per_idle_connection": (rss_idle - rss0) / N}


def summarize(rs):
    """Median of each figure over the repetitions `rs`, its range as `<key>_range`; counts
    summed, each pod's highest in-flight count over all of them."""
    out = {}
    for k, v in rs[0].items():
        if k not in ("rep", "position") and isinstance(v, (int, float)) \
                and not isinstance(v, bool):
            vals = [r[k] for r in rs]
            out[k] = median(vals)
            out[k + "_range"] = [min(vals), max(vals)]
    if "statuses" in rs[0]:
        statuses = {}
        for r in rs:
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        out["statuses"] = statuses
        out["failed"] = sum(r["failed"] for r in rs)
        out["cap_violations"] = sum(r["cap_violations"] for r in rs)
        out["max_inflight"] = [max(r["max_inflight"][p] for r in rs) for p in range(PODS)]
    out["reps"] = len(rs)
    return out


def run(workdir, reps, log):
    if reps < 1:
        raise BenchError("BENCH_QUEUE_REPS must be ≥ 1")
    pods = C.FakePods(workdir, "127.0.1.1", PODS)
    runs = {name: [] for name in ORDER}
    try:
        for rep in range(reps):
            order = ORDER if rep % 2 == 0 else ORDER[::-1]
            for position, name in enumerate(order):
                if name == "pingora":
                    # The floor: bare Pingora in front of one of the same pods, connections only.
                    c = C.BarePingora(workdir, pods.addrs[:1], LIMIT)
                    try:
                        r = asyncio.run(idle_connections(c))
                    finally:
                        c.stop()
                    log(f"queue rep {rep + 1}/{reps} pingora (bare): RSS {r['rss_before_kib']} "
                        f"KiB → {r['rss_idle_conns_kib']} KiB with {N} idle connections: "
                        f"{r['kib_per_idle_connection']:.2f} KiB per idle connection")
                else:
                    c = C.ALL[name](workdir, pods.addrs, LIMIT, max_waiting=N + 1000,
                                    queue_timeout=HOLD_MS // 1000 + 300)
                    try:
                        r = asyncio.run(scenario(c, pods, log))
                    finally:
                        c.stop()
                    log(f"queue rep {rep + 1}/{reps} {name}: {r['kib_per_queued_request']:.2f} KiB "
                        f"per queued request, idle {r['idle_core_share']:.2%} of a core, drained "
                        f"{N} in {r['drain_s']:.2f} s ({r['drain_rps']:.0f}/s), failed "
                        f"{r['failed']}, max in flight {r['max_inflight']}")
                r["rep"], r["position"] = rep + 1, position + 1
                runs[name].append(r)
    finally:
        pods.stop()
    return {
        "bare_pingora": summarize(runs["pingora"]),
        "setup": {"pods": PODS, "limit": LIMIT, "queued": N, "hold_ms": HOLD_MS,
                  "idle_window_s": IDLE_S, "reps": reps,
                  "order": ORDER, "order_note": "repetitions 1, 3, … in this order, 2, 4, … "
                                                "reversed"},
        "results": {name: summarize(runs[name]) for name in ORDER if name != "pingora"},
        "runs": runs,
    }
