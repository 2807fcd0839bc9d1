"""Scenario 2, proxy overhead: tiny keep-alive requests through each proxy, one worker each.

Backend: NGINX `return 200` on 127.0.2.1 (fast, keep-alive). Load: wrk, 1 thread, CONNS
keep-alive connections, DURATION s after a WARMUP s warm-up. Proxies run with one worker
(lb-agent `threads: 1`, HAProxy `nbthread 1`, NGINX `worker_processes 1`), each with a cap far
above the load so that only the forwarding is measured. `direct` is wrk against the backend
itself (the floor).

On a machine with 2+ cores the proxy is pinned to CPU 1 and wrk + backend to CPU 0, so the
proxy under test always has a core of its own. CPU seconds per 10k requests are read from
/proc/<pid>/stat of the proxy's whole process tree (every thread, NGINX master + worker).
"""

import os
import re
import shutil
import subprocess
import time

from . import contenders as C
from .procs import BenchError, cpu_seconds, machine_busy

CONNS, DURATION, WARMUP = 32, 10, 2
ORDER = ["direct", "lb-agent", "haproxy", "nginx"]


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
    r = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
        "requests": int(re.search(r"(\d+) requests in", text).group(1)),
        "p50_ms": _ms(re.search(r"50%\s+(\S+)", text).group(1)),
        "p99_ms": _ms(re.search(r"99%\s+(\S+)", text).group(1)),
    }
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return r


def profile(c, url, cpus, workdir, log):
    """A short `perf` profile of lb-agent under the same load (when perf works here)."""
    if not shutil.which("perf"):
        return None
    data = os.path.join(workdir, "perf.data")
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
    return "\n".join(lines[:40])


def run(workdir, log, with_perf=True):
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed (bench/run installs it on Debian)")
    plan = cpu_plan()
    backend = C.Backend(workdir, "127.0.2.1", cpus=plan["load"])
    results, perf_text = {}, None
    try:
        for name in ORDER:
            if name == "direct":
                c, url = None, f"http://{backend.addr}/"
            else:
                c = C.ALL[name](workdir, [backend.addr], 100000, cpus=plan["proxy"])
                url = f"http://{c.entry[0]}:{c.entry[1]}/"
            try:
                wrk_log = os.path.join(workdir, f"wrk-{name}.log")
                wrk(url, WARMUP, plan["load"], wrk_log)
                cpu0 = cpu_seconds(c.proc.pid) if c else None
                m0, t0 = machine_busy(), time.monotonic()
                r = wrk(url, DURATION, plan["load"], wrk_log)
                wall = time.monotonic() - t0
                m1 = machine_busy()
                if c:
                    cpu = cpu_seconds(c.proc.pid) - cpu0
                    r["cpu_s"] = cpu
                    r["cpu_s_per_10k"] = cpu / r["requests"] * 10000
                    r["proxy_core_share"] = cpu / wall
                ncpu = os.cpu_count() or 1
                r["machine_busy_cores"] = (m1[0] - m0[0]) / (m1[1] - m0[1]) * ncpu
                results[name] = r
                log(
                    f"overhead {name:9} {r['rps']:9.0f} req/s p50 {r['p50_ms']:.3f} ms "
                    f"p99 {r['p99_ms']:.3f} ms"
                    + (f" cpu {r['cpu_s_per_10k']:.3f} s/10k (proxy at "
                       f"{r['proxy_core_share']:.0%} of a core)" if c else "")
                    + f" non-2xx {r['non_2xx']} socket errors {r['socket_errors']}"
                    + f" machine busy {r['machine_busy_cores']:.2f} cores"
                )
                if name == "lb-agent" and with_perf:
                    perf_text = profile(c, url, plan["load"], workdir, log)
            finally:
                if c:
                    c.stop()
    finally:
        backend.stop()
    return {
        "setup": {"connections": CONNS, "duration_s": DURATION, "warmup_s": WARMUP,
                  "pinning": {k: sorted(v) if v else None for k, v in plan.items()}},
        "results": results,
        "perf_lb_agent": perf_text,
    }
