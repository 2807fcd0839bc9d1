"""Scenario 7, the live page's cost (issue 19): "10 open pages must not show in the proxy's
req/s".

lb-agent (the `dist` build, `threads: 1`, RUST_LOG=warn, with `admin_listen`) in front of
PODS fake pods (`testkit fakepods`, answering at once), each pod's cap far above the load, and
wrk driving tiny keep-alive GETs through it as in the overhead part (1 thread, CONNS
connections, a WARMUP s warm-up, then SECS s measured). Two conditions:

* a: no page open: nothing reads the admin port during the measurement.
* b: PAGES open pages (benchkit/pages.py, one process, one thread per page and fetched path):
  each does what src/dashboard.html does in a browser. What it fetches and how often is read
  from the page itself (`setInterval(pollX, MS)` and the `fetch("/…")` inside pollX), so the
  simulation follows the page if it changes; BENCH_PAGE_POLL_MS overrides it.

ROUNDS rounds, each a fresh lb-agent (and fresh pages) per condition, both conditions in every
round, the order reversed every other round (a b, b a, a b, …) so that neither always runs
first. Reported per condition: median and range of req/s, lb-agent CPU s per 10k requests (all
its threads, admin included, from /proc), p50/p99, and b/a round by round with its median and
range; the page fetches served inside the measured windows (count against the count the page's
periods give, errors, latency), and the CPU of lb-agent's `admin` threads.

Pinning as in the overhead part: on 2+ cores lb-agent on CPU 1; wrk, the pods and the pages on
CPU 0, so the pages compete with lb-agent only through lb-agent itself.
"""

import hashlib
import json
import os
import re
import sys
import time

from . import contenders as C
from .overhead import CONNS, WARMUP, children_cpu, cpu_plan, wrk
from .procs import BenchError, Proc, cpu_seconds, machine_busy, thread_cpu_seconds
from .stats import all_of, median, meets, pct

PODS, LIMIT = 4, 100000
PAGES = int(os.environ.get("BENCH_PAGE_N", "10"))
SECS = int(os.environ.get("BENCH_PAGE_SECS", "10"))
ROUNDS = int(os.environ.get("BENCH_PAGE_ROUNDS", "5"))
DASHBOARD = os.path.join(C.ROOT, "src", "dashboard.html")
CONDITIONS = ["a", "b"]
CONDITION_LABEL = {"a": "no page open", "b": f"{PAGES} pages open"}


def page_polls():
    """{path: period ms} of what the live page fetches, read from src/dashboard.html, and
    whether it fetches each once as soon as it opens."""
    try:
        with open(DASHBOARD) as f:
            text = f.read()
    except OSError as e:
        raise BenchError(f"cannot read the live page {DASHBOARD}: {e}")
    polls, at_open = {}, {}
    for fn, ms in re.findall(r"setInterval\(\s*(\w+)\s*,\s*(\d+)\s*\)", text):
        body = re.search(r"function\s+" + re.escape(fn) + r"\s*\([^)]*\)\s*\{(.*?)\n\}", text,
                         re.S)
        paths = re.findall(r"""fetch\(\s*["'](/[^"']*)["']""", body.group(1)) if body else []
        if len(paths) != 1:
            raise BenchError(f"{DASHBOARD}: setInterval({fn}, {ms}) does not fetch exactly one "
                             f"path ({paths}); update bench/benchkit/page.py to what the page does")
        polls[paths[0]] = int(ms)
        at_open[paths[0]] = re.search(r"(^|[;\s])" + re.escape(fn) + r"\(\);", text, re.M) is not None
    if not polls:
        raise BenchError(f"{DASHBOARD} has no setInterval(…) poll; update bench/benchkit/page.py")
    return polls, at_open


def polls_used(page):
    """The page's periods, with BENCH_PAGE_POLL_MS="/metrics=1000,…" applied."""
    used = dict(page)
    for item in filter(None, os.environ.get("BENCH_PAGE_POLL_MS", "").split(",")):
        path, _, ms = item.strip().rpartition("=")
        if not path.startswith("/") or not ms.isdigit() or int(ms) <= 0:
            raise BenchError(f"BENCH_PAGE_POLL_MS: cannot read {item!r} (want /path=ms)")
        used[path] = int(ms)
    return used


def binary(path, how):
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e}")
    return {"path": os.path.relpath(path, C.ROOT) if path.startswith(C.ROOT) else path,
            "built": how, "sha256": digest,
            "mtime": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(st.st_mtime))}


class Pages:
    """The simulated pages (benchkit/pages.py) as a child process on the load CPUs."""

    def __init__(self, workdir, admin, polls, cpus):
        self.out = os.path.join(workdir, "pages.json")
        argv = [sys.executable, "-m", "benchkit.pages", f"{C.HOST}:{admin}", self.out,
                str(PAGES)] + [f"{p}={ms}" for p, ms in polls.items()]
        self.proc = Proc("pages", argv, os.path.join(workdir, "pages.log"), cpus=cpus,
                         env={"PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
                         stdout_pipe=True)
        line = self.proc.read_line(15)
        if not line.startswith("pages ready"):
            raise BenchError(f"the simulated pages said {line!r}")

    def stop(self):
        """Stops the pages; → what they wrote (every fetch)."""
        self.proc.stop()
        try:
            with open(self.out) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise BenchError(f"the simulated pages wrote no result ({e}); log {self.proc.log_path}")


def fetch_summary(fetches, polls, t0, t1):
    """The page fetches that started inside [t0, t1]: per path the count, the count the
    page's period gives for PAGES pages over that window, failures, latency."""
    out = {}
    for path, ms in polls.items():
        mine = [f for f in fetches if f[1] == path and t0 <= f[2] <= t1]
        ok = [f for f in mine if f[7] is None]
        lat = [f[3] * 1000 for f in ok]
        out[path] = {
            "served": len(ok), "failed": len(mine) - len(ok),
            "expected": round(PAGES * (t1 - t0) / (ms / 1000), 1),
            "new_connections": sum(f[6] for f in mine),
            "bytes_mean": round(sum(f[5] for f in ok) / len(ok)) if ok else None,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else None,
            "errors": sorted({f[7] for f in mine if f[7]})[:5],
        }
    return out


def measure(lb, pods, pages, url, plan, wrk_log):
    wrk(url, WARMUP, plan["load"], wrk_log)
    cpu0, th0 = cpu_seconds(lb.proc.pid), thread_cpu_seconds(lb.proc.pid)
    pod0 = cpu_seconds(pods.proc.pid)
    pg0 = cpu_seconds(pages.proc.pid) if pages else 0.0
    k0, m0, t0 = children_cpu(), machine_busy(), time.monotonic()
    r = wrk(url, SECS, plan["load"], wrk_log)
    t1, m1 = time.monotonic(), machine_busy()
    lb_cpu = cpu_seconds(lb.proc.pid) - cpu0
    th1 = thread_cpu_seconds(lb.proc.pid)
    pages_cpu = (cpu_seconds(pages.proc.pid) - pg0) if pages else 0.0
    wall = t1 - t0
    bench_cpu = lb_cpu + cpu_seconds(pods.proc.pid) - pod0 + children_cpu() - k0 + pages_cpu
    busy = (m1[0] - m0[0]) / (m1[1] - m0[1]) * (os.cpu_count() or 1)
    threads = {name: round(s - th0.get(name, 0.0), 3) for name, s in th1.items()}
    admin = [s for name, s in threads.items() if "admin" in name]
    r.update({
        "window_s": round(wall, 3), "window": [t0, t1],
        "cpu_s": lb_cpu, "cpu_s_per_10k": lb_cpu / r["requests"] * 10000 if r["requests"] else None,
        "lb_core_share": lb_cpu / wall,
        "admin_threads_cpu_s": round(sum(admin), 3) if admin else None,
        "threads_cpu_s": threads,
        "pages_process_cores": pages_cpu / wall,
        "machine_busy_cores": busy,
        # Busy cores not accounted for by lb-agent, the pods, wrk and the pages (another build).
        "other_cores": max(0.0, busy - bench_cpu / wall),
    })
    return r


def run(workdir, log):
    if ROUNDS < 1 or SECS < 1 or PAGES < 1:
        raise BenchError("BENCH_PAGE_ROUNDS, BENCH_PAGE_SECS and BENCH_PAGE_N must be ≥ 1")
    page, at_open = page_polls()
    polls = polls_used(page)
    plan = cpu_plan()
    pods = C.FakePods(workdir, "127.0.1.1", PODS, cpus=plan["load"])
    rounds = []
    try:
        for rnd in range(ROUNDS):
            entry = {}
            for cond in CONDITIONS if rnd % 2 == 0 else CONDITIONS[::-1]:
                cdir = os.path.join(workdir, f"round{rnd + 1}-{cond}")
                lb = C.LbAgent(cdir, pods.addrs, LIMIT, cpus=plan["proxy"])
                pages = None
                try:
                    if cond == "b":
                        pages = Pages(cdir, lb.admin, polls, plan["load"])
                    url = f"http://{lb.entry[0]}:{lb.entry[1]}/"
                    r = measure(lb, pods, pages, url, plan, os.path.join(cdir, "wrk.log"))
                    if pages:
                        doc, pages = pages.stop(), None
                        r["page_fetches"] = fetch_summary(doc["fetches"], polls, *r["window"])
                        r["page_skipped_ticks"] = doc["skipped_ticks"]
                        r["page_fetches_whole_run"] = len(doc["fetches"])
                        # Every fetch inside the window, for anyone who wants more than the
                        # summary: [page, path, start s from window start, latency ms, status,
                        # error or null].
                        r["page_fetch_log"] = [
                            [f[0], f[1], round(f[2] - r["window"][0], 4), round(f[3] * 1000, 3),
                             f[4], f[7]]
                            for f in doc["fetches"] if r["window"][0] <= f[2] <= r["window"][1]]
                    del r["window"]
                    entry[cond] = r
                    served = ""
                    if cond == "b":
                        served = " page fetches " + ", ".join(
                            f"{p} {s['served']}/{s['expected']:.0f} (failed {s['failed']}, p99 "
                            f"{s['p99_ms'] if s['p99_ms'] is None else round(s['p99_ms'], 2)} ms)"
                            for p, s in r["page_fetches"].items())
                    log(f"page round {rnd + 1}/{ROUNDS} {cond} ({CONDITION_LABEL[cond]:13}) "
                        f"{r['rps']:9.0f} req/s p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms "
                        f"cpu {r['cpu_s_per_10k']:.3f} s/10k (lb-agent at "
                        f"{r['lb_core_share']:.0%} of a core; admin threads "
                        f"{r['admin_threads_cpu_s']} s) non-2xx {r['non_2xx']} socket errors "
                        f"{r['socket_errors']} other processes {r['other_cores']:.2f} cores{served}")
                finally:
                    if pages:
                        pages.proc.stop()
                    lb.stop()
            entry["ratio"] = {
                "rps": entry["b"]["rps"] / entry["a"]["rps"],
                "cpu_s_per_10k": entry["b"]["cpu_s_per_10k"] / entry["a"]["cpu_s_per_10k"],
                "p99_ms": entry["b"]["p99_ms"] / entry["a"]["p99_ms"],
            }
            entry["order"] = "".join(CONDITIONS if rnd % 2 == 0 else CONDITIONS[::-1])
            rounds.append(entry)
    finally:
        pods.stop()
    return {
        "setup": {
            "pages": PAGES, "polls_ms": polls, "page_polls_ms": page, "page_fetches_at_open": at_open,
            "page_source": os.path.relpath(DASHBOARD, C.ROOT),
            "pods": PODS, "limit": LIMIT, "connections": CONNS, "wrk_threads": 1,
            "warmup_s": WARMUP, "duration_s": SECS, "rounds": ROUNDS,
            "lb_agent_threads": 1, "path": "/",
            "pinning": {k: sorted(v) if v else None for k, v in plan.items()},
            "built": {
                "lb-agent": binary(C.LB_AGENT, "cargo build --profile dist -p lb-agent --bin lb-agent"
                                   if C.LB_AGENT == os.path.join(C.ROOT, "target", "dist", "lb-agent")
                                   else "LB_AGENT_BIN (given by the caller)"),
                "fake pods": binary(C.TESTKIT, "cargo build --release -p testkit"
                                    if C.TESTKIT == os.path.join(C.ROOT, "target", "release", "testkit")
                                    else "TESTKIT_BIN (given by the caller)"),
                "pages": f"bench/benchkit/pages.py under Python {sys.version.split()[0]}",
            },
        },
        "summary": summarize(rounds),
        "rounds": rounds,
    }


def spread(values):
    """(max − min) / median: how far the rounds of one condition fall apart on their own."""
    m = median(values)
    return (max(values) - min(values)) / m if m else None


def summarize(rounds):
    s = {}
    for cond in CONDITIONS:
        rs = [r[cond] for r in rounds]
        s[cond] = {}
        for k in ("rps", "cpu_s_per_10k", "p50_ms", "p99_ms", "lb_core_share", "other_cores",
                  "pages_process_cores"):
            vals = [r[k] for r in rs if r[k] is not None]
            s[cond][k] = median(vals)
            s[cond][k + "_range"] = [min(vals), max(vals)] if vals else None
        s[cond]["rps_spread"] = spread([r["rps"] for r in rs])
        s[cond]["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in rs)
        admin = [r["admin_threads_cpu_s"] / r["window_s"] for r in rs
                 if r["admin_threads_cpu_s"] is not None]
        s[cond]["admin_cores"] = median(admin) if admin else None
    fetches = {}
    for path in rounds[0]["b"]["page_fetches"]:
        per = [r["b"]["page_fetches"][path] for r in rounds]
        lat = [f[3] for r in rounds for f in r["b"]["page_fetch_log"]
               if f[1] == path and f[5] is None]
        fetches[path] = {"served": sum(p["served"] for p in per),
                         "expected": round(sum(p["expected"] for p in per), 1),
                         "failed": sum(p["failed"] for p in per),
                         "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                         "max_ms": max(lat) if lat else None}
    s["page_fetches"] = fetches
    served = sum(v["served"] for v in fetches.values())
    admin_b = sum(r["b"]["admin_threads_cpu_s"] or 0 for r in rounds)
    admin_a = sum(r["a"]["admin_threads_cpu_s"] or 0 for r in rounds)
    s["admin_cpu_ms_per_fetch"] = ((admin_b - admin_a) / served * 1000
                                   if served and rounds[0]["b"]["admin_threads_cpu_s"] is not None
                                   else None)
    ratios = {}
    for k in ("rps", "cpu_s_per_10k", "p99_ms"):
        vals = [r["ratio"][k] for r in rounds]
        ratios[k] = {"median": median(vals), "range": [min(vals), max(vals)], "per_round": vals}
    s["ratio"] = ratios
    # The pages' direct cost: admin CPU per fetch times the fetches per second, as a share of
    # one core. Unlike the req/s ratio it does not drown in the rounds' noise.
    secs = len(rounds) * SECS
    s["direct_core_share"] = (s["admin_cpu_ms_per_fetch"] / 1000 * served / secs
                              if s["admin_cpu_ms_per_fetch"] is not None and secs else None)
    s["verdict"] = verdict(ratios["rps"], ratios["cpu_s_per_10k"], s["a"]["rps_spread"],
                           s["b"]["rps_spread"], s["direct_core_share"])
    return s


def verdict(rps_ratio, cpu_ratio, spread_a, spread_b, direct=None):
    """The rule (bench/README.md), on the rounds' ranges of b/a: *met* when every round's b/a
    is at least 0.98 for req/s and at most 1.02 for lb-agent's CPU per request, and the pages'
    direct cost (admin CPU per fetch × fetches per second) is under 1 % of a core; *not met*
    when every round misses 0.98 for req/s, or every round misses 1.02 for CPU per request, or
    the direct cost is 1 % of a core or more; otherwise a *tie* (some rounds on either side of
    the target: the noise is larger than the effect, more rounds are needed). `met` is True,
    None (tie) or False."""
    lo, hi = rps_ratio["range"]
    clo, chi = cpu_ratio["range"]
    med, cpu = rps_ratio["median"], cpu_ratio["median"]
    own = max(x for x in (spread_a, spread_b, 0.0) if x is not None)
    parts = {"req/s": meets(rps_ratio["range"], 0.98, True),
             "CPU per request": meets(cpu_ratio["range"], 1.02, False),
             "direct cost": None if direct is None else direct < 0.01}
    met = all_of(parts.values())
    direct_txt = f"{direct:.2%} of a core" if direct is not None else "not measured"
    why = (f"b/a {med:.3f} for req/s (rounds {lo:.3f}–{hi:.3f}), {cpu:.3f} for CPU per request "
           f"(rounds {clo:.3f}–{chi:.3f}); the pages' direct cost {direct_txt}; the "
           f"conditions' own spread {own:.0%} between rounds")
    if met is False:
        why += "; missed in every round: " + ", ".join(k for k, v in parts.items() if v is False)
    elif met is None:
        why += "; undecided: " + ", ".join(k for k, v in parts.items() if v is None)
    return {"met": met, "why": why, "drop": 1.0 - med, "own_spread": own}
