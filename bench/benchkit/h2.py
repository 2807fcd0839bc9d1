"""Scenario 5, HTTP/2: one client connection carrying many concurrent streams (issue #6).

A gRPC client typically opens ONE connection and sends every call on it as its own HTTP/2
stream. Behind a ClusterIP Service (kube-proxy) that connection, and so every call, lands on
one pod. A balancer that places each stream on its own spreads the calls over every pod.

Workload: 4 pods × limit 2 (8 slots), each pod working on 2 requests at a time (`--workers 2`,
as in the balance part; extra ones wait inside the pod), HTTP/1.1 pods. h2load with cleartext
HTTP/2 and prior knowledge (`-p h2c`), ONE connection (`-c 1 -t 1`) keeping STREAMS streams
open (`-m`), N requests in all (`-n`), each `GET /work?ms=SERVICE_MS`. Ideal makespan:
ceil(N / 8) × SERVICE_MS.

Contenders, each with an h2c listener: lb-agent (its normal port), HAProxy (`bind … proto h2`),
NGINX OSS 1.22 with `max_conns` and with plain `least_conn` (`listen … http2` on a plain
listener accepts prior-knowledge h2c), and the random model (kube-proxy: one random pod per TCP
connection). The random model forwards bytes, so its pods must speak HTTP/2: each pod gets an
h2c front door of its own (contenders.H2cShim, an uncapped HAProxy per-pod listener).

Measured per run, from h2load's per-request log (`--log-file`: start µs, status, duration µs)
and the pods' own `/_stats`: makespan (first stream opened → last response), failed requests
(anything but a 2xx, including streams that ended without a response), p50/p99 of the stream
times, requests per pod and the highest in-flight count each pod saw.
"""

import math
import os
import re
import shutil
import subprocess

from . import contenders as C
from .procs import BenchError, die_with_bench
from .stats import median, pct, pod_figures

PODS, LIMIT, WORKERS = 4, 2, 2
SLOTS = PODS * LIMIT
N = int(os.environ.get("BENCH_H2_N", "128"))
STREAMS = 32
SERVICE_MS = 200
ORDER = ["lb-agent", "haproxy", "nginx", "nginx-lc", "random"]


def h2load(url, log_path, out_path):
    """Runs h2load once over one h2c connection; returns its per-request rows and summary."""
    if os.path.exists(log_path):
        os.remove(log_path)
    argv = ["h2load", "-p", "h2c", "-t", "1", "-c", "1", "-m", str(STREAMS), "-n", str(N),
            "-N", "60s", f"--log-file={log_path}", url]
    # Worst case (every request on one pod working on WORKERS at a time) plus a margin.
    limit_s = N * SERVICE_MS / 1000 / WORKERS + 60
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=limit_s,
                             preexec_fn=die_with_bench)
    except subprocess.TimeoutExpired:
        raise BenchError(f"h2: h2load against {url} did not finish within {limit_s:.0f} s")
    with open(out_path, "a") as f:
        f.write(f"$ {' '.join(argv)}\n{out.stdout}{out.stderr}\n")
    text = out.stdout
    if out.returncode != 0:
        raise BenchError(f"h2: h2load exited {out.returncode}:\n{text[-2000:]}{out.stderr[-2000:]}")
    proto = re.search(r"^Application protocol: (\S+)", text, re.M)
    if not proto or proto.group(1) != "h2c":
        raise BenchError(f"h2: h2load did not speak h2c to {url} "
                         f"(protocol {proto.group(1) if proto else 'none'}):\n{text[-2000:]}")
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    fin = re.search(r"finished in ([\d.]+)(ms|s),", text)
    if not (req and codes and fin):
        raise BenchError(f"h2: cannot read h2load's summary:\n{text[-2000:]}")
    rows = []
    with open(log_path) as f:
        for line in f:
            start_us, status, dur_us = line.split("\t")[:3]
            rows.append((int(start_us), int(status), int(dur_us)))
    if not rows:
        raise BenchError(f"h2: h2load logged no request against {url}")
    keys = ["total", "started", "done", "succeeded", "failed", "errored", "timeout"]
    return rows, {
        **{f"h2load_{k}": int(v) for k, v in zip(keys, req.groups())},
        "h2load_2xx": int(codes.group(1)),
        "h2load_non_2xx": sum(int(x) for x in codes.groups()[1:]),
        "h2load_finished_s": float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1),
    }


def measure(c, pods, wdir, rep):
    pods.reset()
    host, port = c.entry
    rows, summary = h2load(f"http://{host}:{port}/work?ms={SERVICE_MS}",
                           os.path.join(wdir, f"h2load-rep{rep + 1}.tsv"),
                           os.path.join(wdir, "h2load.log"))
    stats = pods.stats()
    t0 = min(s for s, _, _ in rows)
    makespan = (max(s + d for s, _, d in rows) - t0) / 1e6
    ok = [d / 1000 for _, st, d in rows if 200 <= st < 300]
    # Every request h2load was asked for and did not get a 2xx for: non-2xx answers, streams
    # reset or errored (status -1 in the log), and requests never sent.
    failed = N - len(ok)
    if summary["h2load_2xx"] != len(ok):
        raise BenchError(f"h2: h2load counted {summary['h2load_2xx']} 2xx but logged {len(ok)}")
    ideal = math.ceil(N / SLOTS) * SERVICE_MS / 1000
    statuses = {}
    for _, st, _ in rows:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    if len(rows) < N:
        statuses["not logged"] = N - len(rows)
    return {
        "makespan_s": makespan,
        "ideal_makespan_s": ideal,
        "efficiency": None if failed else ideal / makespan,
        "failed": failed,
        "statuses": statuses,
        "p50_ms": pct(ok, 50),
        "p99_ms": pct(ok, 99),
        **pod_figures(stats, LIMIT, SLOTS, makespan),
        **summary,
    }


def run(workdir, reps, log):
    if not shutil.which("h2load"):
        raise BenchError("h2load is not installed (bench/run installs nghttp2-client on Debian)")
    pods = C.FakePods(workdir, "127.0.1.1", PODS, workers=WORKERS)
    shim = None
    runs = {c: [] for c in ORDER}
    try:
        shim = C.H2cShim(workdir, pods.addrs)
        for rep in range(reps):
            for cname in ORDER:
                upstreams = shim.addrs if cname == "random" else pods.addrs
                c = C.ALL[cname](workdir, upstreams, LIMIT, max_waiting=1000, queue_timeout=30,
                                 h2c=True)
                try:
                    m = measure(c, pods, c.workdir, rep)
                finally:
                    c.stop()
                runs[cname].append(m)
                eff = "—" if m["efficiency"] is None else f"{m['efficiency']:.3f}"
                log(f"h2 rep {rep + 1}/{reps} {cname:9} makespan {m['makespan_s']:.3f} s "
                    f"(ideal {m['ideal_makespan_s']:.3f}) eff {eff} failed {m['failed']}/{N} "
                    f"per pod {m['requests_per_pod']} max in flight {m['max_inflight']}")
    finally:
        if shim:
            shim.stop()
        pods.stop()
    summary = {}
    for cname, ms in runs.items():
        effs = [m["efficiency"] for m in ms]
        summary[cname] = {
            "makespan_s": median([m["makespan_s"] for m in ms]),
            "makespan_range_s": [min(m["makespan_s"] for m in ms),
                                 max(m["makespan_s"] for m in ms)],
            "ideal_makespan_s": ms[0]["ideal_makespan_s"],
            "efficiency": None if None in effs else median(effs),
            "failed": sum(m["failed"] for m in ms),
            "requests": N * len(ms),
            "p50_ms": median([m["p50_ms"] for m in ms]),
            "p99_ms": median([m["p99_ms"] for m in ms]),
            "utilisation": median([m["utilisation"] for m in ms]),
            "requests_per_pod": [m["requests_per_pod"] for m in ms],
            "max_inflight_per_pod": [m["max_inflight"] for m in ms],
            "max_inflight": max(max(m["max_inflight"]) for m in ms),
            "cap_violations": sum(m["cap_violations"] for m in ms),
        }
    return {
        "setup": {"pods": PODS, "limit": LIMIT, "pod_workers": WORKERS, "reps": reps,
                  "requests": N, "streams": STREAMS, "connections": 1, "service_ms": SERVICE_MS,
                  "client": "h2load -p h2c -t 1 -c 1", "random_pods_behind": "h2c shim"},
        "summary": summary,
        "runs": runs,
    }
