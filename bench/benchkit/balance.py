"""Scenario 1, balance quality: the same workloads through every contender.

4 pods × limit 2 (8 slots). Each pod works on at most 2 requests at once (`--workers 2`, like a
compute pod with 2 cores); requests beyond that wait inside the pod, so a pod given more than
its share (as the random model does) finishes late.

Workloads:
* burst: 64 requests of 200 ms at once. Ideal makespan: ceil(64/8) × 200 ms = 1.6 s.
* hetero: 64 requests at once with service times of 20–1500 ms (lognormal, fixed seed).
  Ideal: the lower bound max(Σ service / 8, longest request); no scheduler can beat it.
* trickle: Poisson arrivals at 60% of capacity (24/s, fixed seed) for 6 s, 200 ms each.
  Ideal: every request starts on arrival or on the earliest free slot (FCFS over 8 slots with
  the measured send times). Efficiency = Σ ideal latency / Σ measured latency.

Contenders, each in turn in every repetition: lb-agent, HAProxy, NGINX OSS with `max_conns`
(`nginx`) and with plain `least_conn` (`nginx-lc`, no cap), the random model.
"""

import asyncio
import math
import random

from . import contenders as C
from .client import run_schedule
from .stats import fcfs_on_slots, makespan_lower_bound, median, pct, pod_figures

PODS, LIMIT, WORKERS = 4, 2, 2
SLOTS = PODS * LIMIT
ORDER = ["lb-agent", "haproxy", "nginx", "nginx-lc", "random"]


def workloads():
    rng = random.Random(42)
    hetero = [int(min(1500, max(20, rng.lognormvariate(math.log(150), 1.0)))) for _ in range(64)]
    rng = random.Random(7)
    trickle, t = [], 0.0
    while True:
        t += rng.expovariate(0.6 * SLOTS / 0.2)
        if t > 6.0:
            break
        trickle.append((t, 200))
    return {
        "burst": [(0.0, 200)] * 64,
        "hetero": [(0.0, ms) for ms in hetero],
        "trickle": trickle,
    }


def ideal(name, start, results):
    if name == "hetero":
        return makespan_lower_bound([r.service_ms / 1000 for r in results], SLOTS), None
    jobs = [(r.sent - start, r.service_ms / 1000) for r in results]
    done = fcfs_on_slots(jobs, SLOTS)
    makespan = max(d for _, d in done)
    ideal_latency_sum = sum(d - a for a, d in done)
    return makespan, ideal_latency_sum


def measure(contender, pods, name, schedule):
    pods.reset()
    host, port = contender.entry
    start, results = asyncio.run(run_schedule(host, port, schedule, timeout=60))
    stats = pods.stats()
    ok = [r for r in results if r.error is None and r.status == 200]
    failed = len(results) - len(ok)
    makespan = max(r.done for r in results) - start
    ideal_makespan, ideal_lat = ideal(name, start, results)
    # What a perfect FIFO least-in-flight balancer would do with these requests in the order
    # they were sent (the same as ideal for equal service times).
    fifo = fcfs_on_slots([(r.sent - start, r.service_ms / 1000) for r in results], SLOTS)
    if failed:
        eff = None
    elif name == "trickle":
        eff = ideal_lat / sum(r.latency for r in ok)
    else:
        eff = ideal_makespan / makespan
    lat = [r.latency * 1000 for r in ok]
    statuses = {}
    for r in results:
        key = r.error.split(":")[0] if r.error else str(r.status)
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "makespan_s": makespan,
        "ideal_makespan_s": ideal_makespan,
        "fifo_makespan_s": max(d for _, d in fifo),
        "efficiency": eff,
        "failed": failed,
        "statuses": statuses,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        **pod_figures(stats, LIMIT, SLOTS, makespan),
    }


def run(workdir, reps, log):
    wl = workloads()
    pods = C.FakePods(workdir, "127.0.1.1", PODS, workers=WORKERS)
    runs = {c: {w: [] for w in wl} for c in ORDER}
    try:
        for rep in range(reps):
            for cname in ORDER:
                c = C.ALL[cname](workdir, pods.addrs, LIMIT, max_waiting=1000, queue_timeout=30)
                try:
                    for wname, sched in wl.items():
                        m = measure(c, pods, wname, sched)
                        runs[cname][wname].append(m)
                        eff = "—" if m["efficiency"] is None else f"{m['efficiency']:.3f}"
                        log(
                            f"balance rep {rep + 1}/{reps} {cname:9} {wname:8} makespan "
                            f"{m['makespan_s']:.3f} s (ideal {m['ideal_makespan_s']:.3f}) "
                            f"eff {eff} failed {m['failed']} max in flight {m['max_inflight']}"
                        )
                finally:
                    c.stop()
    finally:
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
                "fifo_makespan_s": median([m["fifo_makespan_s"] for m in ms]),
                "efficiency": None if None in effs else median(effs),
                "efficiency_range": None if None in effs else [min(effs), max(effs)],
                "failed": sum(m["failed"] for m in ms),
                "requests": len(wl[wname]) * len(ms),
                "p50_ms": median([m["p50_ms"] for m in ms]),
                "p99_ms": median([m["p99_ms"] for m in ms]),
                "utilisation": median([m["utilisation"] for m in ms]),
                "max_inflight": max(max(m["max_inflight"]) for m in ms),
                "cap_violations": sum(m["cap_violations"] for m in ms),
            }
    return {
        "setup": {"pods": PODS, "limit": LIMIT, "pod_workers": WORKERS, "reps": reps,
                  "requests": {w: len(s) for w, s in wl.items()},
                  "hetero_total_service_s": sum(ms for _, ms in wl["hetero"]) / 1000},
        "summary": summary,
        "runs": runs,
    }
