"""Scenario 2, proxy overhead: tiny keep-alive requests through each proxy, one worker each.

Backend: NGINX `return 200` on 127.0.2.1 (fast, keep-alive). Load: wrk, 1 thread, CONNS
keep-alive connections, DURATION s after a WARMUP s warm-up; ROUNDS rounds with the proxies
interleaved (every other round in reverse order), every round recorded, median and range
reported. Proxies run with one worker (lb-agent `threads: 1`, HAProxy `nbthread 1`, NGINX
`worker_processes 1`, bare Pingora one thread), each with a cap far above the load so that only
the forwarding is measured; NGINX runs twice, with `max_conns` (`nginx`) and with plain
`least_conn` (`nginx-lc`). `direct` is wrk against the backend itself (the floor of the network
path); `pingora` is a bare Pingora proxy with one fixed peer and no logic
(examples/bare_pingora.rs, built with the same `dist` profile as lb-agent): the floor lb-agent
stands on, so lb-agent's own per-request cost is its difference to that row.

On a machine with 2+ cores the proxy is pinned to CPU 1 and wrk + backend to CPU 0, so the
proxy under test always has a core of its own. CPU seconds per 10k requests are read from
/proc/<pid>/stat of the proxy's whole process tree (every thread, NGINX master + worker).
"""

import os
import re
import resource
import shutil
import subprocess
import time

from . import contenders as C
from .procs import BenchError, cpu_seconds, machine_busy
from .stats import median

CONNS, DURATION, WARMUP = 32, 6, 2
ROUNDS = int(os.environ.get("BENCH_OVERHEAD_ROUNDS", "3"))
ORDER = ["direct", "pingora", "lb-agent", "haproxy", "nginx", "nginx-lc"]


def cpu_plan():
    n = os.cpu_count() or 1
    if n >= 2:
        return {"proxy": {1}, "load": {0}}
    return {"proxy": None, "load": None}


def _ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise BenchError(f"cannot read wrk latency {text!r}")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def wrk(url, seconds, cpus, log_path):
    argv = ["wrk", "-t1", f"-c{CONNS}", f"-d{seconds}s", "--latency", url]
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pre,
                         timeout=seconds + 30)
    with open(log_path, "a") as f:
        f.write(out.stdout + out.stderr)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr}")
    text = out.stdout
    dist = re.search(r"Latency Distribution\n(.*?)\n\s*\d+ requests in", text, re.S)
    if not dist:
        raise BenchError(f"wrk printed no latency distribution:\n{text}")
    r = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
        "requests": int(re.search(r"(\d+) requests in", text).group(1)),
        "p50_ms": _ms(re.search(r"^\s*50%\s+(\S+)", dist.group(1), re.M).group(1)),
        "p99_ms": _ms(re.search(r"^\s*99%\s+(\S+)", dist.group(1), re.M).group(1)),
    }
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return r


def profile(c, url, cpus, workdir, log):
    """A short `perf` profile of `c` (lb-agent, bare Pingora) under the same load (when perf
    works here)."""
    if not shutil.which("perf"):
        return None
    data = os.path.join(workdir, f"perf-{c.name}.data")
    rec = subprocess.Popen(
        ["perf", "record", "-F", "499", "-g", "-p", str(c.proc.pid), "-o", data, "--", "sleep", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wrk(url, 6, cpus, os.path.join(workdir, "wrk-perf.log"))
    _, err = rec.communicate(timeout=30)
    if rec.returncode != 0:
        log(f"overhead: perf record failed, no profile: {err.strip()[:200]}")
        return None
    rep = subprocess.run(
        ["perf", "report", "-i", data, "--stdio", "--no-children", "-F", "overhead,dso,sym",
         "--percent-limit", "1", "-g", "none"],
        capture_output=True, text=True, timeout=120)
    lines = [l.rstrip() for l in rep.stdout.splitlines() if l.strip() and not l.startswith("#")]
    if not lines:
        log(f"overhead: perf report printed no samples (exit {rep.returncode}): "
            f"{rep.stderr.strip()[:300]}; no profile")
        return None
    return "\n".join(lines[:40])


def children_cpu():
    """CPU seconds of this process's waited-for children (wrk, after each run)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(c, url, backend, plan, wrk_log):
    """One warm-up and one measured wrk run against `url` (through `c`, or direct)."""
    wrk(url, WARMUP, plan["load"], wrk_log)
    cpu0 = cpu_seconds(c.proc.pid) if c else 0.0
    b0, k0 = cpu_seconds(backend.proc.pid), children_cpu()
    m0, t0 = machine_busy(), time.monotonic()
    r = wrk(url, DURATION, plan["load"], wrk_log)
    wall = time.monotonic() - t0
    m1 = machine_busy()
    proxy_cpu = (cpu_seconds(c.proc.pid) - cpu0) if c else 0.0
    bench_cpu = proxy_cpu + cpu_seconds(backend.proc.pid) - b0 + children_cpu() - k0
    ncpu = os.cpu_count() or 1
    r["machine_busy_cores"] = (m1[0] - m0[0]) / (m1[1] - m0[1]) * ncpu
    # Whatever else ran on the machine meanwhile (another build, say): busy cores not
    # accounted for by the proxy, the backend and wrk.
    r["other_cores"] = max(0.0, r["machine_busy_cores"] - bench_cpu / wall)
    if c:
        r["cpu_s"] = proxy_cpu
        r["cpu_s_per_10k"] = proxy_cpu / r["requests"] * 10000
        r["proxy_core_share"] = proxy_cpu / wall
    return r


def run(workdir, log, with_perf=True):
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed (bench/run installs it on Debian)")
    plan = cpu_plan()
    backend = C.Backend(workdir, "127.0.2.1", cpus=plan["load"])
    rounds, perf_text = {n: [] for n in ORDER}, {}
    try:
        for rnd in range(ROUNDS):
            # Every other round runs the contenders in reverse, so that none always runs
            # right after the same neighbour (or first, on a cooler machine).
            for name in ORDER if rnd % 2 == 0 else ORDER[::-1]:
                if name == "direct":
                    c, url = None, f"http://{backend.addr}/"
                else:
                    c = C.ALL[name](workdir, [backend.addr], 100000, cpus=plan["proxy"])
                    url = f"http://{c.entry[0]}:{c.entry[1]}/"
                try:
                    r = measure(c, url, backend, plan, os.path.join(workdir, f"wrk-{name}.log"))
                    rounds[name].append(r)
                    log(
                        f"overhead round {rnd + 1}/{ROUNDS} {name:9} {r['rps']:9.0f} req/s "
                        f"p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms"
                        + (f" cpu {r['cpu_s_per_10k']:.3f} s/10k (proxy at "
                           f"{r['proxy_core_share']:.0%} of a core)" if c else "")
                        + f" non-2xx {r['non_2xx']} socket errors {r['socket_errors']}"
                        + f" other processes {r['other_cores']:.2f} cores"
                    )
                    if name in ("lb-agent", "pingora") and with_perf and rnd == 0:
                        perf_text[name] = profile(c, url, plan["load"], workdir, log)
                finally:
                    if c:
                        c.stop()
    finally:
        backend.stop()
    results = {}
    for name, rs in rounds.items():
        results[name] = {k: median([r[k] for r in rs]) for k in rs[0]
                         if k not in ("non_2xx", "socket_errors", "requests")}
        results[name]["non_2xx"] = sum(r["non_2xx"] for r in rs)
        results[name]["socket_errors"] = sum(r["socket_errors"] for r in rs)
        results[name]["rps_range"] = [min(r["rps"] for r in rs), max(r["rps"] for r in rs)]
        results[name]["p99_range_ms"] = [min(r["p99_ms"] for r in rs), max(r["p99_ms"] for r in rs)]
        if "cpu_s_per_10k" in rs[0]:
            results[name]["cpu_range_s_per_10k"] = [min(r["cpu_s_per_10k"] for r in rs),
                                                    max(r["cpu_s_per_10k"] for r in rs)]
    # lb-agent against the bare Pingora proxy of the same round (they ran back to back, so a
    # machine that was slower for a while weighs on both): the spread of the ratio.
    per_round = [
        {"rps": lb["rps"] / bare["rps"], "cpu": lb["cpu_s_per_10k"] / bare["cpu_s_per_10k"]}
        for lb, bare in zip(rounds["lb-agent"], rounds["pingora"])
    ]
    return {
        "setup": {"connections": CONNS, "duration_s": DURATION, "warmup_s": WARMUP,
                  "rounds": ROUNDS,
                  "pinning": {k: sorted(v) if v else None for k, v in plan.items()}},
        "results": results,
        "rounds": rounds,
        "lb_agent_vs_bare_per_round": per_round,
        "perf_lb_agent": perf_text.get("lb-agent"),
        "perf_pingora": perf_text.get("pingora"),
    }
