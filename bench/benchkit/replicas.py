"""Scenario 6, several replicas (issue #12): one strict cap across agents, and what it costs.

6 pods × limit 2 (12 slots), each pod working on 2 requests at a time (`--workers 2`, as in the
balance part). Contenders, each reached by a client that picks one of its replicas uniformly at
random per request (what a ClusterIP Service in front of the replicas does):

* one:         one lb-agent, in-process ledger: the reference.
* redis:       three lb-agents sharing one real `redis-server` on loopback
               (`ledger: {redis: redis://127.0.0.1:PORT/0}`): global caps, global least in
               flight, one FIFO queue.
* haproxy:     three HAProxy instances, each with `maxconn <limit>` per server and
               `balance leastconn`, as people deploy them today: each counts only its own
               requests, so a pod can get up to 3 × limit.
* partitioned: three lb-agents, each given a disjoint third of the pods (in-process ledgers), as
               Knative's activator splits pods among its replicas: caps hold, but one agent
               queues while another's pods sit idle.

Workloads (each run BENCH_REPS times per contender, contenders interleaved, median reported;
the agent each request goes to is drawn from a seeded generator, the same draws for every
contender of a repetition):
* burst:  96 requests of 200 ms at once. Ideal makespan ceil(96/12) × 200 ms = 1.6 s.
* hetero: 96 requests at once, 20–1500 ms (lognormal, fixed seed). Ideal: the lower bound
          max(Σ service / 12, longest request).

Max in flight per pod and cap violations come from the pods' own `/_stats`. Before the runs,
the first request on the fresh Redis is timed apart (`fresh_ledger`): a one-time hold, not the
steady state the runs measure.

Added latency of the ledger: sequential `GET /work?ms=0` on one keep-alive connection through
one agent with the Redis ledger, and through the same agent config without it (rounds
interleaved, warm-up discarded); p50/p99 of each and the difference. The Redis agent's own
`lb_ledger_round_trip_seconds` tells how many ledger calls a request made and how long one took.
"""

import asyncio
import math
import os
import random
import socket
import time

from . import contenders as C
from .client import Result, one
from .procs import BenchError, Proc, free_port, http_get_sync, wait_tcp
from .stats import makespan_lower_bound, median, pct, pod_figures

PODS, LIMIT, WORKERS, REPLICAS = 6, 2, 2, 3
SLOTS = PODS * LIMIT
N_REQUESTS = 96
ORDER = ["one", "redis", "haproxy", "partitioned"]
LAT_N = int(os.environ.get("BENCH_REPLICAS_LAT_N", "2000"))  # requests per latency round
LAT_WARMUP = 200
LAT_ROUNDS = int(os.environ.get("BENCH_REPLICAS_LAT_ROUNDS", "5"))


def workloads():
    rng = random.Random(42)
    hetero = [int(min(1500, max(20, rng.lognormvariate(math.log(150), 1.0))))
              for _ in range(N_REQUESTS)]
    return {"burst": [200] * N_REQUESTS, "hetero": hetero}


class Redis:
    """A real `redis-server` on a free loopback port, nothing persisted; stopped with the bench."""

    def __init__(self, workdir):
        self.port = free_port()
        self.proc = Proc("redis-server", [
            "redis-server", "--port", str(self.port), "--bind", C.HOST, "--save", "",
            "--appendonly", "no", "--dir", workdir], os.path.join(workdir, "redis.log"))
        wait_tcp(C.HOST, self.port, 10, self.proc)
        self.url = f"redis://{C.HOST}:{self.port}/0"

    def stop(self):
        self.proc.stop()


def _named(cls, name, **extra):
    """A contender class under its own name (its own work directory and log), optionally
    writing a `ledger:` section at the top of an lb-agent config."""

    class Named(cls):
        def write(self, fname, text):
            if fname == "config.yaml" and extra.get("ledger"):
                text = f"ledger: {{redis: \"{extra['ledger']}\"}}\n" + text
            return super().write(fname, text)

    Named.name = name
    return Named


class Group:
    """Replicas of one contender; `entries` are their client-facing addresses."""

    def __init__(self, members):
        self.members = members

    @property
    def entries(self):
        return [m.entry for m in self.members]

    def stop(self):
        for m in self.members:
            m.stop()


def start(cname, workdir, pods, redis_url):
    """Starts contender `cname` (every replica ready) and returns its Group."""
    kw = {"max_waiting": 1000, "queue_timeout": 30}
    members = []
    try:
        if cname == "one":
            members.append(_named(C.LbAgent, "one")(workdir, pods, LIMIT, **kw))
        elif cname == "redis":
            for i in range(REPLICAS):
                cls = _named(C.LbAgent, f"redis-{i + 1}", ledger=redis_url)
                members.append(cls(workdir, pods, LIMIT, **kw))
        elif cname == "haproxy":
            for i in range(REPLICAS):
                members.append(_named(C.HAProxy, f"haproxy-{i + 1}")(workdir, pods, LIMIT, **kw))
        elif cname == "partitioned":
            for i in range(REPLICAS):
                part = pods[i * PODS // REPLICAS:(i + 1) * PODS // REPLICAS]
                cls = _named(C.LbAgent, f"partitioned-{i + 1}")
                members.append(cls(workdir, part, LIMIT, **kw))
        else:
            raise BenchError(f"unknown replicas contender {cname}")
    except BaseException:
        for m in members:
            m.stop()
        raise
    return Group(members)


async def run_burst(entries, services, pick, timeout):
    """All requests at once; request i goes to entries[pick[i]]. Returns (start, [Result])."""
    start = time.monotonic()
    results = [Result(ms) for ms in services]
    await asyncio.gather(*(
        one(*entries[k], f"/work?ms={ms}", r, timeout)
        for ms, k, r in zip(services, pick, results)))
    return start, results


def measure(group, pods, services, pick):
    pods.reset()
    start, results = asyncio.run(run_burst(group.entries, services, pick, timeout=60))
    stats = pods.stats()
    ok = [r for r in results if r.error is None and r.status == 200]
    failed = len(results) - len(ok)
    makespan = max(r.done for r in results) - start
    ideal = makespan_lower_bound([ms / 1000 for ms in services], SLOTS)
    statuses = {}
    for r in results:
        key = r.error.split(":")[0] if r.error else str(r.status)
        statuses[key] = statuses.get(key, 0) + 1
    lat = [r.latency * 1000 for r in ok]
    return {
        "makespan_s": makespan,
        "ideal_makespan_s": ideal,
        "efficiency": None if failed else ideal / makespan,
        "failed": failed,
        "statuses": statuses,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "requests_per_replica": [pick.count(k) for k in range(len(group.entries))],
        **pod_figures(stats, LIMIT, SLOTS, makespan),
    }


# --- added latency of the ledger ---------------------------------------------------------------

class KeepAlive:
    """A blocking HTTP/1.1 client on one keep-alive connection (small, fixed-length answers)."""

    def __init__(self, host, port):
        self.host = host
        self.s = socket.create_connection((host, port), timeout=5)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, path):
        self.s.sendall(f"GET {path} HTTP/1.1\r\nhost: {self.host}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
            elif k.strip().lower() == b"transfer-encoding":
                raise BenchError("chunked answer in the latency client; expected content-length")
        while len(rest) < length:
            self.buf = rest
            self._recv()
            rest = self.buf
        self.buf = rest[length:]
        return status

    def _recv(self):
        chunk = self.s.recv(65536)
        if not chunk:
            raise BenchError("connection closed during the latency run")
        self.buf += chunk

    def close(self):
        self.s.close()


def sequential(entry, n, warmup):
    """`n` sequential `?ms=0` requests (after `warmup` unmeasured ones) → latencies in ms."""
    c = KeepAlive(*entry)
    try:
        out = []
        for i in range(warmup + n):
            t0 = time.perf_counter_ns()
            status = c.get("/work?ms=0")
            dt = (time.perf_counter_ns() - t0) / 1e6
            if status != 200:
                raise BenchError(f"latency run: answer {status}")
            if i >= warmup:
                out.append(dt)
        return out
    finally:
        c.close()


def ledger_histogram(agent):
    """(count, sum seconds) of the agent's lb_ledger_round_trip_seconds."""
    status, body = http_get_sync(C.HOST, agent.admin, "/metrics")
    if status != 200:
        raise BenchError(f"lb-agent /metrics answered {status}")
    count = total = None
    for line in body.splitlines():
        if line.startswith("lb_ledger_round_trip_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith("lb_ledger_round_trip_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
    return count, total


def added_latency(workdir, pods, redis_url, log):
    agents = {"in-process": _named(C.LbAgent, "latency-in-process")(workdir, pods, LIMIT),
              "redis": _named(C.LbAgent, "latency-redis", ledger=redis_url)(workdir, pods, LIMIT)}
    lat = {k: [] for k in agents}
    rounds = {k: [] for k in agents}
    calls = secs = 0.0
    try:
        for rnd in range(LAT_ROUNDS):
            for k, a in agents.items():
                before = ledger_histogram(a) if k == "redis" else None
                v = sequential(a.entry, LAT_N, LAT_WARMUP)
                if before:
                    after = ledger_histogram(a)
                    if None not in before + after:
                        calls += after[0] - before[0]
                        secs += after[1] - before[1]
                lat[k] += v
                rounds[k].append({"p50_ms": pct(v, 50), "p99_ms": pct(v, 99)})
                log(f"replicas latency round {rnd + 1}/{LAT_ROUNDS} {k:10} p50 "
                    f"{pct(v, 50):.3f} ms p99 {pct(v, 99):.3f} ms")
    finally:
        for a in agents.values():
            a.stop()
    out = {k: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "mean_ms": sum(v) / len(v),
               "requests": len(v), "rounds": rounds[k]} for k, v in lat.items()}
    # Includes the warm-up requests and lease renewals (one call per pool per second).
    per_req = LAT_ROUNDS * (LAT_N + LAT_WARMUP)
    out["ledger_calls_per_request"] = calls / per_req if calls else None
    out["ledger_round_trip_mean_ms"] = secs / calls * 1000 if calls else None
    out["added_p50_ms"] = out["redis"]["p50_ms"] - out["in-process"]["p50_ms"]
    out["added_p99_ms"] = out["redis"]["p99_ms"] - out["in-process"]["p99_ms"]
    return out


def fresh_ledger(workdir, pods, redis_url, log):
    """Seconds the first request through an agent on a fresh (empty) Redis takes. An empty Redis
    is a new ledger epoch, and the agents hold every grant for a while after one so that the
    replicas of a restarted Redis can re-assert their leases first (README, "Running several
    replicas"). That is a one-time cost per Redis start, reported here; the measured runs come
    after it, on a ledger in its steady state."""
    agent = _named(C.LbAgent, "fresh-ledger", ledger=redis_url)(workdir, pods, LIMIT)
    try:
        t0 = time.monotonic()
        status, _ = http_get_sync(C.HOST, agent.port, "/work?ms=0", timeout=30)
        took = time.monotonic() - t0
    finally:
        agent.stop()
    if status != 200:
        raise BenchError(f"first request on a fresh ledger answered {status}")
    log(f"replicas: the first request on a fresh Redis ledger took {took:.3f} s")
    return took


def run(workdir, reps, log):
    wl = workloads()
    pods = C.FakePods(workdir, "127.0.1.1", PODS, workers=WORKERS)
    redis = None
    runs = {c: {w: [] for w in wl} for c in ORDER}
    try:
        redis = Redis(workdir)
        first_request_s = fresh_ledger(workdir, pods.addrs, redis.url, log)
        for rep in range(reps):
            rng = random.Random(1000 + rep)
            # One draw per request, reused by every contender of this repetition.
            draws = {w: [rng.randrange(REPLICAS) for _ in s] for w, s in wl.items()}
            for cname in ORDER:
                group = start(cname, workdir, pods.addrs, redis.url)
                try:
                    for wname, services in wl.items():
                        pick = draws[wname] if len(group.entries) > 1 else [0] * len(services)
                        m = measure(group, pods, services, pick)
                        runs[cname][wname].append(m)
                        eff = "—" if m["efficiency"] is None else f"{m['efficiency']:.3f}"
                        log(f"replicas rep {rep + 1}/{reps} {cname:11} {wname:6} makespan "
                            f"{m['makespan_s']:.3f} s (ideal {m['ideal_makespan_s']:.3f}) eff "
                            f"{eff} failed {m['failed']} max in flight {m['max_inflight']}")
                finally:
                    group.stop()
        latency = added_latency(workdir, pods.addrs, redis.url, log)
    finally:
        if redis:
            redis.stop()
        pods.stop()
    summary = {}
    for cname in ORDER:
        summary[cname] = {}
        for wname, ms in runs[cname].items():
            effs = [m["efficiency"] for m in ms]
            summary[cname][wname] = {
                "makespan_s": median([m["makespan_s"] for m in ms]),
                "makespan_range_s": [min(m["makespan_s"] for m in ms),
                                     max(m["makespan_s"] for m in ms)],
                "ideal_makespan_s": median([m["ideal_makespan_s"] for m in ms]),
                "efficiency": None if None in effs else median(effs),
                "efficiency_range": None if None in effs else [min(effs), max(effs)],
                "failed": sum(m["failed"] for m in ms),
                "requests": len(wl[wname]) * len(ms),
                "p50_ms": median([m["p50_ms"] for m in ms]),
                "p99_ms": median([m["p99_ms"] for m in ms]),
                "utilisation": median([m["utilisation"] for m in ms]),
                # Per pod, the highest in-flight count it saw in any run.
                "max_inflight_per_pod": [max(m["max_inflight"][p] for m in ms)
                                         for p in range(PODS)],
                "cap_violations": sum(m["cap_violations"] for m in ms),
            }
    for wname in wl:
        ref = summary["one"][wname]["efficiency"]
        for cname in ORDER:
            e = summary[cname][wname]["efficiency"]
            summary[cname][wname]["vs_one"] = e / ref if e is not None and ref else None
    return {
        "setup": {"pods": PODS, "limit": LIMIT, "pod_workers": WORKERS, "replicas": REPLICAS,
                  "reps": reps, "requests": N_REQUESTS,
                  "hetero_total_service_s": sum(wl["hetero"]) / 1000,
                  "latency_requests_per_round": LAT_N, "latency_rounds": LAT_ROUNDS,
                  "latency_warmup": LAT_WARMUP},
        "summary": summary,
        "latency": latency,
        "fresh_ledger_first_request_s": first_request_s,
        "runs": runs,
    }
