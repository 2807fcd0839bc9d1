"""lb-agent bench suite: `python3 bench/suite.py [all|balance|h2|overhead|queue|selection|
replicas|page|asyncjobs|reqpath …]`.

Normally started by `bash bench/run`, which installs the tools and builds lb-agent first.
Each part writes bench/results/<part>.json; then the markdown table (results/latest.md, and
the results section of bench/README.md) and the plots are rendered from every JSON present.
"""

import atexit
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchkit import asyncjobs, balance, h2, overhead, page, queue, replicas, report, reqpath, selection  # noqa: E402
from benchkit.contenders import BARE_PINGORA, LB_AGENT, ROOT, TESTKIT, describe  # noqa: E402
from benchkit.procs import BenchError, OtherLoad, loadavg, stop_all  # noqa: E402

PARTS = ["balance", "h2", "overhead", "queue", "selection", "replicas", "page", "asyncjobs",
         "reqpath"]
NEEDS = {"balance": ["haproxy", "nginx"], "h2": ["haproxy", "nginx", "h2load"],
         "overhead": ["haproxy", "nginx", "wrk"], "queue": ["haproxy"], "selection": ["cargo"],
         "replicas": ["haproxy", "redis-server"], "page": ["wrk"], "asyncjobs": ["haproxy"],
         "reqpath": ["nginx", "valgrind"]}
# The binaries a part starts (selection builds its own with cargo).
BINARIES = {"balance": [LB_AGENT, TESTKIT], "h2": [LB_AGENT, TESTKIT],
            "overhead": [LB_AGENT, BARE_PINGORA], "queue": [LB_AGENT, TESTKIT, BARE_PINGORA],
            "selection": [], "replicas": [LB_AGENT, TESTKIT], "page": [LB_AGENT, TESTKIT],
            "asyncjobs": [LB_AGENT, TESTKIT], "reqpath": [LB_AGENT, BARE_PINGORA]}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def on_signal(signum, _frame):
    raise SystemExit(f"bench: stopped by signal {signum}")


def sh(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    tools = "; ".join(x for x in [
        sh("haproxy", "-v").splitlines()[0] if shutil.which("haproxy") else "",
        sh("sh", "-c", "nginx -v 2>&1"),
        sh("sh", "-c", "wrk -v 2>&1 | head -1"),
        sh("h2load", "--version") if shutil.which("h2load") else "",
        f"Python {platform.python_version()}",
        sh("rustc", "--version"),
    ] if x)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_kib / 2**20,
            "kernel": f"Linux {platform.release()}", "tools": tools}


def commit():
    head = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD")
    # The code that was measured; results and the README are rewritten by every run.
    dirty = sh("git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "src",
               "Cargo.toml", "Cargo.lock", "examples", "bench/run", "bench/suite.py", "bench/selection.rs",
               "bench/benchkit")
    return head + ("+uncommitted changes" if dirty else "")


def main(argv):
    parts = argv or ["all"]
    if "all" in parts:
        parts = PARTS
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"bench: unknown part(s) {unknown}; choose from all {' '.join(PARTS)}")
    missing = sorted({t for p in parts for t in NEEDS[p] if not shutil.which(t)})
    if missing:
        sys.exit(f"bench: missing tools {missing}; run `bash bench/run`, which installs them")
    for binary in sorted({b for p in parts for b in BINARIES[p]}):
        if not os.access(binary, os.X_OK):
            sys.exit(f"bench: {binary} not found; run `bash bench/run`, which builds it")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if "queue" in parts and hard < queue.N + 2000:
        sys.exit(f"bench: the open-files limit is {hard}; the queue part needs {queue.N + 2000} "
                 f"(raise it, e.g. `ulimit -Hn 65536` as root, or set BENCH_QUEUE_N lower)")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    atexit.register(stop_all)
    os.makedirs(report.RESULTS, exist_ok=True)
    work = tempfile.mkdtemp(prefix="lb-agent-bench-")
    log(f"bench: parts {' '.join(parts)}; logs and configs in {work}; load average {loadavg()}")
    with open(os.path.join(report.RESULTS, "machine.json"), "w") as f:
        json.dump({**machine(), "commit": commit()}, f, indent=1)
    reps = int(os.environ.get("BENCH_REPS", "3"))
    for part in parts:
        pdir = os.path.join(work, part)
        os.makedirs(pdir)
        started = datetime.datetime.now().astimezone()
        at = commit()
        before = loadavg()
        log(f"== {part} (load average {before})")
        others = OtherLoad()
        try:
            if part == "balance":
                data = balance.run(pdir, reps, log)
            elif part == "h2":
                data = h2.run(pdir, int(os.environ.get("BENCH_H2_REPS", "2")), log)
            elif part == "overhead":
                data = overhead.run(pdir, log, with_perf=os.environ.get("BENCH_PERF", "1") == "1")
            elif part == "queue":
                data = queue.run(pdir, queue.REPS, log)
            elif part == "replicas":
                data = replicas.run(pdir, reps, log)
            elif part == "page":
                data = page.run(pdir, log)
            elif part == "asyncjobs":
                data = asyncjobs.run(pdir, reps, log)
            elif part == "reqpath":
                data = reqpath.run(pdir, log)
            else:
                data = selection.run(pdir, log)
        except BenchError as e:
            stop_all()
            sys.exit(f"bench: {part} failed: {e}\n(logs in {pdir})")
        others_mean, others_peak = others.stop()
        now = commit()
        if now != at:
            at += f" (the tree was at {now} when the part ended)"
        meta = {"started": started.isoformat(timespec="seconds"),
                "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "seconds": round((datetime.datetime.now().astimezone() - started).total_seconds()),
                "commit": at, "loadavg_before": before, "loadavg_after": loadavg(),
                "other_processes_cores_mean": round(others_mean, 3),
                "other_processes_cores_peak": round(others_peak, 3), "machine": machine(),
                # How every contender of the harness was built and configured at this commit.
                "contenders": describe()}
        with open(os.path.join(report.RESULTS, f"{part}.json"), "w") as f:
            json.dump({"meta": meta, "data": data}, f, indent=1)
        log(f"== {part} done in {meta['seconds']} s (load average {meta['loadavg_after']}; "
            f"other processes used {others_mean:.2f} cores on average, {others_peak:.2f} at peak)")
    pngs = report.render()
    log(f"bench: wrote {os.path.relpath(report.RESULTS, ROOT)}/latest.md, "
        f"{', '.join(pngs)} and the results section of bench/README.md")


if __name__ == "__main__":
    main(sys.argv[1:])
