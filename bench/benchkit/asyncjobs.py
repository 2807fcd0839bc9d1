"""Asynchronous jobs (issue 17): `POST` a job → `202` + `Location` at once, the pod works on it
in the background, the client polls the `Location` until `303` (done).

4 fake asynchronous pods (`testkit asyncpods --workers 1`): each works on one job at a time and
keeps the others waiting inside it, like a pod with one GPU, so a pod handed more jobs than its
share finishes late. `limit: 1` per pod. Job ids differ across pods, so a poll that reaches a pod
other than the job's owner is always a `404` (counted by the pods themselves).

Workload: 24 jobs submitted at once with mixed durations (200 ms – 4 s, lognormal, fixed seed).
Each client polls its job's `Location` every 250 ms until `303` (done) or `404` (its job is
unknown where the poll landed: the client has lost its job).

Contenders:
* lb-agent, pods call back: a finished job `POST`s lb-agent's callback URL (the job's slot is
  freed at once);
* lb-agent, status checks only: the same pods told not to call back (`nocallback=1`), so the
  slot is freed when lb-agent's own status check every 500 ms (or a client's poll) sees `303`;
* HAProxy `leastconn` with `maxconn 1` per server: the `202` ends the request, so the cap and the
  queue see nothing of the job;
* random: kube-proxy's model, a random pod per connection.

Figures, per contender (median over reps, ranges): the pods' own highest count of jobs held
(accepted and not finished; the cap is 1), jobs per pod, makespan from the first submission to the
pods' last finished job, efficiency = lower bound / makespan (the lower bound: the work spread
evenly over the 4 pods, or the longest job; no scheduler finishes sooner), client polls that
reached a pod that did not own the job, and jobs whose client saw them done.
"""

import asyncio
import math
import os
import random
import time

from . import contenders as C
from .procs import BenchError
from .stats import makespan_lower_bound, median

PODS, LIMIT, WORKERS = 4, 1, 1
SLOTS = PODS * LIMIT
POLL_S = 0.25
JOB_DEADLINE_S = 180
ORDER = ["lb-agent", "lb-agent-checks", "haproxy", "random"]
LABEL = {"lb-agent": "lb-agent (pods call back)",
         "lb-agent-checks": "lb-agent (status checks every 500 ms, no callback)",
         "haproxy": "HAProxy leastconn, maxconn 1", "random": "random (kube-proxy model)"}


def workload():
    rng = random.Random(17)
    return [int(min(4000, max(200, rng.lognormvariate(math.log(900), 0.8)))) for _ in range(24)]


class AsyncPods(C.FakePods):
    """`testkit asyncpods --callback`: asynchronous pods, started and read like the fake pods
    (their `/_stats` JSON has their own fields: `submitted`, `running`, `max_running`, …)."""

    kind = "asyncpods"
    extra = ["--callback"]


class AsyncLbAgent(C.LbAgent):
    route_extra = "    async: {check_interval: 500ms, max_duration: 10m, done_when: redirect}\n"


async def exchange(host, port, method, path):
    """One request on its own connection (`Connection: close`); returns (status, headers)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\n"
                     "connection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    if not data:
        raise ConnectionError("closed without an answer")
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def one_job(host, port, ms, extra_query):
    """Submits a job and polls it. Returns a dict of what the client saw."""
    out = {"ms": ms, "submitted": None, "accepted_after_s": None, "polls": 0, "polls_404": 0,
           "seen_done_after_s": None, "error": None}
    t0 = time.monotonic()
    try:
        status, headers = await asyncio.wait_for(
            exchange(host, port, "POST", f"/submit?ms={ms}{extra_query}"), JOB_DEADLINE_S)
        out["accepted_after_s"] = time.monotonic() - t0
        if status != 202 or "location" not in headers:
            out["error"] = f"submission answered {status}"
            return out
        out["submitted"] = True
        at = headers["location"]
        while time.monotonic() - t0 < JOB_DEADLINE_S:
            await asyncio.sleep(POLL_S)
            status, _ = await exchange(host, port, "GET", at)
            out["polls"] += 1
            if status == 303:
                out["seen_done_after_s"] = time.monotonic() - t0
                return out
            if status == 404:
                out["polls_404"] += 1
                return out  # the client's job is unknown where its poll landed: it is lost
            if status not in (200, 202):
                out["error"] = f"poll answered {status}"
                return out
        out["error"] = "deadline"
    except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


async def submit_all(host, port, jobs, extra_query):
    return await asyncio.gather(*(one_job(host, port, ms, extra_query) for ms in jobs))


def measure(contender, pods, jobs, extra_query):
    pods.reset()
    start_unix = time.time()
    seen = asyncio.run(submit_all(*contender.entry, jobs, extra_query))
    # Every job the pods accepted runs to its end whatever the clients saw; wait for the last.
    accepted = sum(1 for s in seen if s["submitted"])
    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        stats = pods.stats()
        if sum(s["finished"] for s in stats) >= accepted and all(s["running"] == 0 for s in stats):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{contender.name}: jobs still running after {JOB_DEADLINE_S} s")
        time.sleep(0.05)
    makespan = max(s["last_done_unix_ms"] for s in stats) / 1000 - start_unix
    ideal = makespan_lower_bound([ms / 1000 for ms in jobs], SLOTS)
    failed = len(jobs) - accepted
    return {
        "makespan_s": makespan,
        "ideal_makespan_s": ideal,
        "efficiency": None if failed else ideal / makespan,
        "failed_submissions": failed,
        "errors": sorted({s["error"] for s in seen if s["error"]}),
        "jobs_per_pod": [s["submitted"] for s in stats],
        "max_running": [s["max_running"] for s in stats],
        "cap_violations": sum(1 for s in stats if s["max_running"] > LIMIT),
        "client_polls": sum(s["polls"] for s in seen),
        "client_polls_404": sum(s["polls_404"] for s in seen),
        "pod_unknown_polls": sum(s["unknown_polls"] for s in stats),
        "jobs_seen_done": sum(1 for s in seen if s["seen_done_after_s"] is not None),
        "callbacks_sent": sum(s["callbacks_sent"] for s in stats),
        "accept_wait_max_s": max((s["accepted_after_s"] or 0) for s in seen),
    }


def run(workdir, reps, log):
    jobs = workload()
    pods = AsyncPods(workdir, "127.0.1.1", PODS, WORKERS)
    runs = {c: [] for c in ORDER}
    try:
        for rep in range(reps):
            for cname in ORDER:
                cls = AsyncLbAgent if cname.startswith("lb-agent") else C.ALL[cname]
                c = cls(workdir, pods.addrs, LIMIT, max_waiting=1000,
                        queue_timeout=JOB_DEADLINE_S)
                extra = "&nocallback=1" if cname == "lb-agent-checks" else ""
                try:
                    m = measure(c, pods, jobs, extra)
                finally:
                    c.stop()
                runs[cname].append(m)
                eff = "—" if m["efficiency"] is None else f"{m['efficiency']:.3f}"
                log(f"asyncjobs rep {rep + 1}/{reps} {cname:15} makespan {m['makespan_s']:.2f} s "
                    f"(lower bound {m['ideal_makespan_s']:.2f}) eff {eff} jobs/pod "
                    f"{m['jobs_per_pod']} max held {m['max_running']} polls at the wrong pod "
                    f"{m['client_polls_404']}/{m['client_polls']} seen done "
                    f"{m['jobs_seen_done']}/{len(jobs)}")
    finally:
        pods.stop()
    summary = {}
    for cname, ms in runs.items():
        effs = [m["efficiency"] for m in ms]
        spans = [m["makespan_s"] for m in ms]
        summary[cname] = {
            "label": LABEL[cname],
            "makespan_s": median(spans),
            "makespan_range_s": [min(spans), max(spans)],
            "ideal_makespan_s": ms[0]["ideal_makespan_s"],
            "efficiency": None if None in effs else median(effs),
            "efficiency_range": None if None in effs else [min(effs), max(effs)],
            "max_running": max(max(m["max_running"]) for m in ms),
            "cap_violations": sum(m["cap_violations"] for m in ms),
            "jobs_per_pod_spread": [min(min(m["jobs_per_pod"]) for m in ms),
                                    max(max(m["jobs_per_pod"]) for m in ms)],
            "client_polls": sum(m["client_polls"] for m in ms),
            "client_polls_404": sum(m["client_polls_404"] for m in ms),
            "pod_unknown_polls": sum(m["pod_unknown_polls"] for m in ms),
            "jobs_seen_done": sum(m["jobs_seen_done"] for m in ms),
            "jobs": len(jobs) * len(ms),
            "failed_submissions": sum(m["failed_submissions"] for m in ms),
        }
    return {
        "setup": {"pods": PODS, "limit": LIMIT, "pod_workers": WORKERS, "reps": reps,
                  "jobs": len(jobs), "job_ms": jobs, "poll_s": POLL_S,
                  "total_work_s": sum(jobs) / 1000},
        "summary": summary,
        "runs": runs,
    }
