"""Renders bench/results/*.json into bench/results/latest.md, PNG plots, and the results
section of bench/README.md (between the `results:begin` / `results:end` markers).

Every number comes from the JSON a run wrote; nothing here adjusts or fills in values."""

import json
import os
import re

from .stats import beats, median, meets

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
README = os.path.join(os.path.dirname(RESULTS), "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
LABEL = {"lb-agent": "lb-agent", "haproxy": "HAProxy", "nginx": "NGINX OSS (max_conns)",
         "nginx-lc": "NGINX OSS (plain least_conn)", "random": "random (kube-proxy model)",
         "direct": "direct (no proxy)", "pingora": "pingora (bare)"}
# Plot tick labels.
SHORT = {"lb-agent": "lb-agent", "haproxy": "HAProxy", "nginx": "NGINX\nmax_conns",
         "nginx-lc": "NGINX\nleast_conn", "random": "random", "direct": "direct",
         "pingora": "pingora"}
COLOR = {"lb-agent": "#d95f02", "haproxy": "#1b9e77", "nginx": "#7570b3", "nginx-lc": "#b9b4e0",
         "random": "#999999", "direct": "#444444", "pingora": "#e6ab02"}
# Contenders without a per-pod cap: their pods' counts above the limit are not violations.
NO_CAP = {"random", "nginx-lc", "pingora"}
VERDICT = {True: "met", False: "**not met**", None: "tie"}


def load(name):
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def f(v, fmt="{:.3f}", none="—"):
    return none if v is None else fmt.format(v)


def span(r, key, range_key=None):
    """[lo, hi] of a figure over the repetitions: its recorded range (`<key>_range` unless
    named), or [v, v] from a results file that recorded one value; None when there is none."""
    got = r.get(range_key or f"{key}_range")
    if got:
        return got
    v = r.get(key)
    return None if v is None else [v, v]


def per_round(rounds, a, b, key):
    """a's `key` ÷ b's, round by round (the contenders of a round ran back to back), or None."""
    ra, rb = rounds.get(a), rounds.get(b)
    if not ra or not rb:
        return None
    vals = [x[key] / y[key] for x, y in zip(ra, rb)
            if x.get(key) is not None and y.get(key)]
    return vals or None


def ratio_txt(vals, fmt="{:.2f}"):
    """`0.44× (0.43–0.46)`: median and range of per-round ratios."""
    if not vals:
        return "—"
    return (f"{fmt.format(median(vals))}× ({fmt.format(min(vals))}–"
            f"{fmt.format(max(vals))})")


def when(d):
    m = d["meta"]
    others = ""
    if "other_processes_cores_mean" in m:
        others = (f"; processes outside the bench used {m['other_processes_cores_mean']:.2f} "
                  f"cores on average, {m['other_processes_cores_peak']:.2f} at peak")
    return (f"_Measured {m['finished']} (commit `{m['commit']}`, {m['seconds']} s), load average "
            f"before {m['loadavg_before']}, after {m['loadavg_after']}{others}._")


def balance_md(d):
    s = d["data"]["setup"]
    out = [f"### Balance quality ({s['pods']} pods × limit {s['limit']}, each pod works on "
           f"{s['pod_workers']} at a time; median of {s['reps']} runs)", "", when(d), "",
           "| workload | balancer | makespan s (range) | ideal s | efficiency (range) | failed | "
           "p50 ms | p99 ms | utilisation | max in flight on a pod | cap violations |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    summ = d["data"]["summary"]
    for w in ["burst", "hetero", "trickle"]:
        for c, per in summ.items():
            r = per[w]
            rng = r["makespan_range_s"]
            capv = "no cap" if c in NO_CAP else str(r["cap_violations"])
            eff = f(r["efficiency"])
            if r.get("efficiency_range"):
                eff += f" ({r['efficiency_range'][0]:.3f}–{r['efficiency_range'][1]:.3f})"
            out.append(
                f"| {w} | {LABEL[c]} | {r['makespan_s']:.3f} ({rng[0]:.3f}–{rng[1]:.3f}) | "
                f"{r['ideal_makespan_s']:.3f} | {eff} | "
                f"{r['failed']}/{r['requests']} | {f(r['p50_ms'], '{:.0f}')} | "
                f"{f(r['p99_ms'], '{:.0f}')} | {r['utilisation']:.2f} | {r['max_inflight']} | "
                f"{capv} |")
    fifo = summ.get("lb-agent", {}).get("hetero", {}).get("fifo_makespan_s")
    out += ["", "Workloads: **burst** 64 × 200 ms at once; **hetero** 64 requests at once, "
            f"20–1500 ms (Σ {s['hetero_total_service_s']:.1f} s; ideal = lower bound "
            "max(Σ/8, longest), which needs the service times in advance: a perfect FIFO "
            "least-in-flight balancer, taking the requests in the order they were sent, "
            f"would finish in {f(fifo)} s); **trickle** Poisson arrivals at 60 % of capacity for 6 s, "
            "200 ms each (efficiency = Σ ideal latency / Σ measured latency). Efficiency is "
            "left blank when requests failed. Utilisation = Σ service time / (8 slots × "
            "makespan). Cap violations: pods whose own in-flight count went above the limit "
            "(summed over runs); the contenders without a cap (NGINX with plain `least_conn`, "
            "the random model) show their pods' highest count in the column before.", ""]
    return out


def per_pod(runs):
    """Per-pod values of each run: `32·32·32·32` per run, runs separated by ` / `."""
    return " / ".join("·".join(str(v) for v in run) for run in runs)


def h2_md(d):
    s = d["data"]["setup"]
    summ = d["data"]["summary"]
    out = [f"### HTTP/2: one client connection, {s['streams']} concurrent streams "
           f"({s['pods']} pods × limit {s['limit']}, each pod works on {s['pod_workers']} at a "
           f"time; median of {s['reps']} runs)", "", when(d), "",
           "| balancer | makespan s (range) | ideal s | efficiency | failed | p50 ms | p99 ms | "
           "requests per pod | max in flight per pod | cap violations |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in summ.items():
        rng = r["makespan_range_s"]
        capv = "no cap" if c in NO_CAP else str(r["cap_violations"])
        out.append(
            f"| {LABEL[c]} | {r['makespan_s']:.3f} ({rng[0]:.3f}–{rng[1]:.3f}) | "
            f"{r['ideal_makespan_s']:.3f} | {f(r['efficiency'])} | {r['failed']}/{r['requests']} "
            f"| {f(r['p50_ms'], '{:.0f}')} | {f(r['p99_ms'], '{:.0f}')} | "
            f"{per_pod(r['requests_per_pod'])} | {per_pod(r['max_inflight_per_pod'])} | {capv} |")
    out += ["", f"`{s['client']} -m {s['streams']} -n {s['requests']}` on "
            f"`http://…/work?ms={s['service_ms']}`: cleartext HTTP/2 with prior knowledge, one "
            f"TCP connection keeping {s['streams']} streams open, {s['requests']} requests of "
            f"{s['service_ms']} ms; the pods speak HTTP/1.1. Ideal = ceil({s['requests']} / "
            f"{s['pods'] * s['limit']} slots) × {s['service_ms']} ms. Makespan: first stream "
            "opened to last response, from h2load's per-request log; p50/p99: time of a stream "
            "from its opening (the client keeps the streams open, so this includes the wait in "
            "the balancer's queue). Failed: requests without a 2xx answer. Per-pod columns: each "
            "pod's own counters (`/_stats`), pods 1·2·3·4, one group per run. Efficiency is left "
            "blank when requests failed. The random model (kube-proxy) forwards the one TCP "
            "connection to one pod, which must then speak HTTP/2 itself: there each pod sits "
            "behind its own uncapped h2c → HTTP/1.1 door (one HAProxy listener per pod), so the "
            "pod sees every stream the client sends it.", ""]
    return out


def first_word(v):
    return str(v).split(" ", 1)[0]


def floor_alike(d):
    """How lb-agent and bare Pingora of results file `d` were built and run, compared: a phrase
    for the tables and Targets rows."""
    c = d.get("meta", {}).get("contenders")
    if not c or "pingora" not in c:
        return ("lb-agent's and bare Pingora's builds and runtimes are not recorded in this "
                "results file (measured before the harness recorded them)")
    lb, bare = c["lb-agent"], c["pingora"]
    diff = [f"{k} {lb[k]} vs {bare[k]}" for k in ("profile", "threads", "work_stealing")
            if (lb[k] if k == "profile" else first_word(lb[k]))
            != (bare[k] if k == "profile" else first_word(bare[k]))]
    if diff:
        return "lb-agent and bare Pingora NOT built and run alike: " + "; ".join(diff)
    return (f"lb-agent and bare Pingora built and run alike ({lb['profile']}; "
            f"{first_word(lb['threads'])} thread; work_stealing {first_word(lb['work_stealing'])})")


def overhead_md(d):
    s = d["data"]["setup"]
    res = d["data"]["results"]
    rounds = d["data"].get("rounds", {})

    def rel(c, base, key):
        return ratio_txt(per_round(rounds, c, base, key)) if base in res else "—"

    out = [f"### Proxy overhead (wrk, 1 thread, {s['connections']} keep-alive connections, "
           f"{s['duration_s']} s × {s['rounds']} rounds, median; one worker per proxy; proxy "
           f"pinned to CPU {s['pinning']['proxy']}, wrk + backend to CPU {s['pinning']['load']})",
           "", when(d), "",
           "| proxy | req/s (range) | vs bare Pingora | vs HAProxy | p50 ms | p99 ms (range) | "
           "p99 vs HAProxy | CPU s per 10k req (range) | vs bare Pingora | vs HAProxy | "
           "proxy CPU (cores) | non-2xx + socket errors | other processes (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in res.items():
        cpu = f(r.get("cpu_s_per_10k"))
        if r.get("cpu_range_s_per_10k"):
            lo, hi = r["cpu_range_s_per_10k"]
            cpu += f" ({lo:.3f}–{hi:.3f})"
        others = [x["other_cores"] for x in rounds.get(c, [])]
        out.append(
            f"| {LABEL[c]} | {r['rps']:.0f} ({r['rps_range'][0]:.0f}–{r['rps_range'][1]:.0f}) | "
            f"{rel(c, 'pingora', 'rps')} | {rel(c, 'haproxy', 'rps')} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} ({r['p99_range_ms'][0]:.2f}–{r['p99_range_ms'][1]:.2f}) | "
            f"{rel(c, 'haproxy', 'p99_ms')} | {cpu} | {rel(c, 'pingora', 'cpu_s_per_10k')} | "
            f"{rel(c, 'haproxy', 'cpu_s_per_10k')} | {f(r.get('proxy_core_share'), '{:.2f}')} | "
            f"{r['non_2xx'] + r['socket_errors']} | {r['other_cores']:.2f}"
            + (f" (max {max(others):.2f})" if others else "") + " |")
    paired = d["data"].get("lb_agent_vs_bare_per_round")
    if paired:
        out += ["", "lb-agent ÷ bare Pingora in each round (the two ran back to back): req/s "
                + ", ".join(f"{p['rps']:.2f}×" for p in paired) + "; CPU per request "
                + ", ".join(f"{p['cpu']:.2f}×" for p in paired) + "."]
    disturbed = [f"round {i + 1} {LABEL[c]} ({x['other_cores']:.3f} cores)"
                 for c, xs in rounds.items() for i, x in enumerate(xs) if x["other_cores"] > 0.1]
    out += ["", "Every round is in the results file (`data.rounds`) and in the ranges above; "
            "none is left out. The \"vs\" columns are the ratios of the two contenders round by "
            "round (they ran back to back in each round): median (range). Rounds in which other "
            "processes took more than 0.1 cores: " + (", ".join(disturbed) or "none") + ".", "",
            "pingora (bare) is `examples/bare_pingora.rs`: Pingora 0.9 with one fixed peer and "
            f"no logic; {floor_alike(d)}. "
            "CPU per 10k requests is the proxy's own CPU (all its threads and processes) "
            "from /proc/<pid>/stat. A proxy CPU near 1.00 core means the proxy was the "
            "bottleneck; well below it, wrk or the backend (sharing the other core) was, and "
            "the req/s of that proxy is a lower bound. Other processes: busy cores on the "
            "machine not used by the proxy, the backend or wrk during the run (another build, "
            "say); above ~0.1 the run was disturbed.", ""]
    for key, who in (("perf_lb_agent", "lb-agent"), ("perf_pingora", "bare Pingora")):
        if d["data"].get(key):
            out += [f"<details><summary>perf profile of {who} under this load (top symbols, "
                    "self time)</summary>", "", "```", d["data"][key], "```",
                    "</details>", ""]
    return out


def queue_md(d):
    s = d["data"]["setup"]
    reps = s.get("reps", 1)

    def v(r, key, fmt, scale=1):
        """median (range) of a figure, or the one value of an older results file."""
        out = fmt.format(r[key] * scale)
        sp = r.get(f"{key}_range")
        if sp and reps > 1:
            out += f" ({fmt.format(sp[0] * scale)}–{fmt.format(sp[1] * scale)})"
        return out

    runs = (f"median (range) of {reps} repetitions, the contenders in turn, the order reversed "
            "every other repetition" if reps > 1 else "one run of each")
    out = [f"### Queue scale ({s['queued']} requests queued on {s['pods']} pods × limit "
           f"{s['limit']} held busy; {runs})", "", when(d), "",
           "| balancer | RSS before MiB | RSS with queue MiB | KiB per queued request | "
           "of which the idle connection | idle CPU with queue (% of a core) | idle CPU "
           "empty | time to fill s | drain s | "
           "drain req/s | failed | max in flight on a pod |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in d["data"]["results"].items():
        empty = ("—" if r.get("empty_idle_core_share") is None
                 else v(r, "empty_idle_core_share", "{:.2f}", 100))
        out.append(
            f"| {LABEL[c]} | {r['rss_before_kib'] / 1024:.1f} | {r['rss_queued_kib'] / 1024:.1f} "
            f"| {v(r, 'kib_per_queued_request', '{:.2f}')} | "
            f"{v(r, 'kib_per_idle_connection', '{:.2f}')} | "
            f"{v(r, 'idle_core_share', '{:.2f}', 100)} | {empty} | "
            f"{r['fill_s']:.1f} | {v(r, 'drain_s', '{:.2f}')} | {r['drain_rps']:.0f} | "
            f"{r['failed']} | {max(r['max_inflight'])} |")
    bare = d["data"].get("bare_pingora")
    lb = d["data"]["results"].get("lb-agent")
    if bare:
        out.append(
            f"| {LABEL['pingora']} (idle connections only) | {bare['rss_before_kib'] / 1024:.1f} "
            f"| {bare['rss_idle_conns_kib'] / 1024:.1f} (idle) | — | "
            f"{v(bare, 'kib_per_idle_connection', '{:.2f}')} | — | — | — | — | — | — | — |")
    if bare and lb and "kib_queued_over_idle" in lb:
        b = bare["kib_per_idle_connection"]
        out += ["", f"**Memory split of a queued lb-agent request** ({s['queued']} at once, RSS "
                "differences divided by the count" + (", medians" if reps > 1 else "")
                + "): bare Pingora holds "
                f"{b:.2f} KiB per idle connection (accepted, nothing sent). lb-agent holds "
                f"{lb['kib_per_idle_connection']:.2f} KiB per idle connection (its front door "
                "waits for the first bytes before Pingora's per-connection session exists), and "
                f"the queued request adds {v(lb, 'kib_queued_over_idle', '{:.2f}')} KiB on top: "
                f"{lb['kib_per_queued_request']:.2f} KiB in all, "
                f"{lb['kib_per_queued_request'] - b:+.2f} KiB against a connection that merely "
                "sits idle in bare Pingora. glibc's reuse of freed memory moves these parts "
                "between runs by a few KiB" + (" (the ranges show by how much here)"
                                               if reps > 1 else "") + f". {floor_alike(d)}."]
    out += ["", "NGINX OSS has no queue (beyond `max_conns` it fails at once) and the random "
            "model has none either, so neither is run here. Drain time runs from the first "
            "blocker's response (slots free) to the last queued response; it includes the "
            "Python client reading 10k responses.", ""]
    return out


def selection_md(d):
    res = d["data"]["results"]
    out = ["### Selection cost (criterion: one pick + release through `Balancer::acquire`, "
           "limit 4)", "", when(d), "", "| pods | all idle µs | mixed load µs |",
           "|---|---|---|"]
    for n in d["data"]["setup"]["sizes"]:
        out.append(f"| {n} | {res[f'idle/{n}']['mean_ns'] / 1000:.2f} | "
                   f"{res[f'mixed/{n}']['mean_ns'] / 1000:.2f} |")
    out += ["", "Mean of criterion's estimate. Mixed: pod i holds i mod 4 requests.", ""]
    queued = d["data"]["setup"].get("queued_retries")
    if queued:
        out += ["| queued retries that tried pod 0 | µs per release of pod 0's slot + pick |",
                "|---|---|"]
        for n in queued:
            r = res[f"release_with_queued_retries/{n}"]
            lo, hi = r["mean_ci_ns"]
            out.append(f"| {n} | {r['mean_ns'] / 1000:.2f} ({lo / 1000:.2f}–{hi / 1000:.2f}) |")
        out += ["", "`release_with_queued_retries`: 4 pods × limit 1, all busy, the queued "
                "retries all tried pod 0; one iteration gives pod 0's slot back and takes it "
                "again. Mean of criterion's estimate (its confidence interval).", ""]
    return out


def commit_of(*ds):
    """The commit(s) results files were measured at, for a Targets row."""
    seen = []
    for d in ds:
        c = d["meta"]["commit"]
        if c not in seen:
            seen.append(c)
    return ", ".join(f"`{c}`" for c in seen)


def balance_target_rows(bal):
    s = bal["data"]["summary"]
    lb, ha = s["lb-agent"]["burst"], s["haproxy"]["burst"]
    lbr, har = span(lb, "efficiency"), span(ha, "efficiency")
    reps = bal["data"]["setup"]["reps"]
    return [
        ("burst efficiency ≥ 0.95 (every run)",
         f"{f(lb['efficiency'])} ({rng(lbr)}), {reps} runs",
         False if lbr is None else meets(lbr, 0.95, True)),
        ("burst efficiency ≥ HAProxy's (ranges over the runs)",
         f"lb-agent {f(lb['efficiency'])} ({rng(lbr)}), HAProxy {f(ha['efficiency'])} "
         f"({rng(har)})",
         False if lbr is None else True if har is None else beats(lbr, har, True)),
    ]


def overhead_target_rows(ovh):
    r, rounds = ovh["data"]["results"], ovh["data"].get("rounds", {})
    rows = []
    lb = r.get("lb-agent")
    if not lb:
        return rows

    def both(key, other, fmt, unit, range_key=None):
        o = r[other]
        return (f"lb-agent {fmt.format(lb[key])} ({rng(span(lb, key, range_key), fmt)}) {unit}, "
                f"{LABEL[other]} {fmt.format(o[key])} ({rng(span(o, key, range_key), fmt)}) "
                f"{unit}; lb-agent ÷ {LABEL[other]} round by round "
                f"{ratio_txt(per_round(rounds, 'lb-agent', other, key))}")

    def verdict(key, other, higher, range_key=None):
        return beats(span(lb, key, range_key), span(r[other], key, range_key), higher)

    if "haproxy" in r:
        rows.append(("one-thread throughput ≥ HAProxy's",
                     both("rps", "haproxy", "{:.0f}", "req/s"), verdict("rps", "haproxy", True)))
        rows.append(("p99 ≤ HAProxy's", both("p99_ms", "haproxy", "{:.2f}", "ms", "p99_range_ms"),
                     verdict("p99_ms", "haproxy", False, "p99_range_ms")))
    if "pingora" in r:
        rows.append(("one-thread throughput ≥ bare Pingora's",
                     both("rps", "pingora", "{:.0f}", "req/s") + f"; {floor_alike(ovh)}",
                     verdict("rps", "pingora", True)))
        rows.append(("CPU per request ≤ bare Pingora's",
                     both("cpu_s_per_10k", "pingora", "{:.3f}", "s per 10k", "cpu_range_s_per_10k"),
                     verdict("cpu_s_per_10k", "pingora", False, "cpu_range_s_per_10k")))
    return rows


def queue_target_rows(que):
    q, setup = que["data"]["results"]["lb-agent"], que["data"]["setup"]
    reps = setup.get("reps", 1)
    kib, idle = span(q, "kib_per_queued_request"), span(q, "idle_core_share")
    if reps > 1:
        kib_txt, idle_txt = f" ({rng(kib, '{:.2f}')}), {reps} runs", (
            f" ({idle[0] * 100:.2f}–{idle[1] * 100:.2f} %), {reps} runs")
    else:
        kib_txt = idle_txt = ", 1 run"
    return [
        ("≤ 4 KiB RSS per queued request (every run)",
         f"{q['kib_per_queued_request']:.2f} KiB{kib_txt}", meets(kib, 4, False)),
        (f"idle CPU ~0 with {setup['queued']:,} queued (≤ 1 % of a core, every run)",
         f"{q['idle_core_share'] * 100:.2f} % of a core{idle_txt}", meets(idle, 0.01, False)),
    ]


def targets_md(bal, ovh, que, h2=None, rep=None, page=None, aj=None):
    rows = []  # (target, measured, verdict, commit)

    def add(d, part_rows):
        rows.extend((t, m, ok, commit_of(d)) for t, m, ok in part_rows)

    if bal:
        add(bal, balance_target_rows(bal))
    caps, where = [], []
    if bal:
        lb = bal["data"]["summary"]["lb-agent"]
        caps.append(("balance", sum(r["cap_violations"] for r in lb.values())))
        where.append(bal)
    if que and "lb-agent" in que["data"]["results"]:
        caps.append(("queue", que["data"]["results"]["lb-agent"]["cap_violations"]))
        where.append(que)
    if h2 and "lb-agent" in h2["data"]["summary"]:
        caps.append(("h2", h2["data"]["summary"]["lb-agent"]["cap_violations"]))
        where.append(h2)
    if caps:
        total = sum(n for _, n in caps)
        rows.append(("zero cap violations (lb-agent, all runs)",
                     f"{total} (" + ", ".join(f"{p} {n}" for p, n in caps) + ")", total == 0,
                     commit_of(*where)))
    if ovh:
        add(ovh, overhead_target_rows(ovh))
    if que and "lb-agent" in que["data"]["results"]:
        add(que, queue_target_rows(que))
    if rep:
        add(rep, replicas_target_rows(rep))
    if page:
        add(page, [page_target_row(page)])
    if aj:
        add(aj, asyncjobs_target_rows(aj))
    if not rows:
        return []
    commits = []
    for d in (bal, h2, ovh, que, rep, page, aj):
        if d and d["meta"]["commit"] not in commits:
            commits.append(d["meta"]["commit"])
    head = (f"All parts measured at commit `{commits[0]}`." if len(commits) == 1 else
            "**The parts were measured at different commits** ("
            + ", ".join(f"`{c}`" for c in commits) + "): not one `bash bench/run all`; each row "
            "names the commit its figures come from.")
    out = ["### Targets", "", head + " Verdicts are computed from the ranges over the runs "
           "(repetitions or rounds) in the results files: against a fixed target, *met* when "
           "every run meets it, *not met* when none does, a *tie* when the range spans the "
           "target; against another contender, a *tie* when the two ranges overlap, otherwise "
           "met or not met by which side is better.", "",
           "| target | measured (lb-agent) | verdict | commit |", "|---|---|---|---|"]
    out += [f"| {t} | {m} | {VERDICT[ok]} | {c} |" for t, m, ok, c in rows]
    return out + [""]


def machine_md(m):
    at = f" (written by the run at commit `{m['commit']}`)" if m.get("commit") else ""
    return [f"### Machine{at}", "", f"- {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.0f} GiB; "
            f"{m['kernel']}", f"- {m['tools']}", ""]


CONTENDER_ORDER = ["lb-agent", "pingora", "haproxy", "nginx", "nginx-lc", "random"]


def contenders_md(parts):
    """How the contenders were built and configured, from the results files' meta.contenders
    (`parts`: {part: results file or None})."""
    have = {p: d for p, d in parts.items() if d}
    told = {p: d for p, d in have.items() if d["meta"].get("contenders")}
    out = ["### Contenders as run", ""]
    untold = [f"{p} (`{d['meta']['commit']}`)" for p, d in have.items() if p not in told]
    if not told:
        return out + ["_No results file records how its contenders were built and configured "
                      "(all were measured before the harness recorded it): "
                      + ", ".join(untold) + ". bench/README.md describes the harness as it is "
                      "now, which is not necessarily what these files measured._", ""]
    newest = max(told, key=lambda p: told[p]["meta"]["finished"])
    ref = told[newest]["meta"]["contenders"]
    same = [p for p in told if told[p]["meta"]["contenders"] == ref]
    other = [p for p in told if p not in same]
    out.append("_Recorded by the results files of " + ", ".join(
        f"{p} (`{told[p]['meta']['commit']}`)" for p in same) + "."
        + (" Recorded differently by " + ", ".join(other) + " (see their JSON, "
           "`meta.contenders`)." if other else "")
        + (" Not recorded by " + ", ".join(untold) + " (measured before the harness recorded "
           "it)." if untold else "") + "_")
    out += ["", "| contender | built | threads | work-stealing runtime | configuration |",
            "|---|---|---|---|---|"]
    for c in CONTENDER_ORDER + [c for c in ref if c not in CONTENDER_ORDER]:
        if c in ref:
            r = ref[c]
            built = r["built"] + ("" if r["profile"] in ("—", "distribution package")
                                  else f", profile {r['profile']}")
            out.append(f"| {LABEL.get(c, c)} | {built} | {r['threads']} | "
                       f"{r['work_stealing']} | {r['config']} |")
    return out + [""]


def plots(bal, ovh, que, h2=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if bal:
        s = bal["data"]["summary"]
        wls = ["burst", "hetero", "trickle"]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(s)
        for i, (c, per) in enumerate(s.items()):
            xs = [j + i * width for j in range(len(wls))]
            vals = [per[w]["efficiency"] or 0 for w in wls]
            bars = ax.bar(xs, vals, width, label=LABEL[c], color=COLOR[c])
            for x, w, b in zip(xs, wls, bars):
                if per[w]["efficiency"] is None:
                    ax.text(x, 0.02, f"{per[w]['failed']}/{per[w]['requests']}\nfailed",
                            ha="center", va="bottom", fontsize=7, rotation=90)
                else:
                    ax.text(x, b.get_height() + 0.01, f"{b.get_height():.2f}", ha="center",
                            va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks([j + width * (len(s) - 1) / 2 for j in range(len(wls))], wls)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("efficiency (ideal / measured)")
        ax.set_title("Balance quality: 4 pods × limit 2 (higher is better, 1 = ideal)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                  ncol=min(len(s), 3), frameon=False)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "balance.png"), dpi=110)
        plt.close(fig)
        made.append("balance.png")
    if h2:
        s, setup = h2["data"]["summary"], h2["data"]["setup"]
        names = list(s)
        npods = setup["pods"]
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.8),
                                         gridspec_kw={"width_ratios": [3, 3, 2]})
        width = 0.8 / npods
        for ax, key, title in (
                (a1, "requests_per_pod", f"requests per pod (of {setup['requests']}), run 1"),
                (a2, "max_inflight_per_pod", "max in flight on each pod, run 1")):
            for i, c in enumerate(names):
                vals = s[c][key][0]
                xs = [i + (p - (npods - 1) / 2) * width for p in range(npods)]
                bars = ax.bar(xs, vals, width * 0.9, color=COLOR[c])
                for x, b in zip(xs, bars):
                    ax.text(x, b.get_height(), str(int(b.get_height())), ha="center",
                            va="bottom", fontsize=6)
            ax.set_xticks(range(len(names)), [SHORT.get(c, c) for c in names], fontsize=7)
            ax.set_title(title + " (bars: pods 1–4)", fontsize=9)
        for i, c in enumerate(names):
            failed = h2["data"]["runs"][c][0]["failed"]
            if failed:
                counts = s[c]["requests_per_pod"][0]
                unseen = sum(counts) + failed == setup["requests"]
                a1.text(i, max(counts) + setup["requests"] * 0.06,
                        f"+ {failed} failed" + ("\n(never reached a pod)" if unseen else ""),
                        ha="center", va="bottom", fontsize=7)
        a2.axhline(setup["limit"], color="black", lw=0.8, ls="--")
        a2.text(len(names) - 0.5, setup["limit"], f"limit {setup['limit']}", va="bottom",
                ha="right", fontsize=7)
        bars = a3.bar([SHORT.get(c, c) for c in names], [s[c]["makespan_s"] for c in names],
                      color=[COLOR[c] for c in names])
        for c, b in zip(names, bars):
            note = (f"{s[c]['failed']}/{s[c]['requests']}\nfailed" if s[c]["failed"]
                    else f"{b.get_height():.2f}")
            a3.text(b.get_x() + b.get_width() / 2, b.get_height(), note, ha="center",
                    va="bottom", fontsize=7)
        ideal = s[names[0]]["ideal_makespan_s"]
        a3.axhline(ideal, color="black", lw=0.8, ls="--")
        a3.set_title(f"makespan s, median (dashed: ideal {ideal:.1f} s)", fontsize=9)
        a3.tick_params(axis="x", labelsize=8)
        fig.suptitle(f"HTTP/2: {setup['requests']} requests on ONE client connection "
                     f"({setup['streams']} streams at a time), {npods} pods × limit "
                     f"{setup['limit']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "h2.png"), dpi=110)
        plt.close(fig)
        made.append("h2.png")
    if ovh:
        r = ovh["data"]["results"]
        names = list(r)
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, key, title, fmt in (
                (a1, "rps", "requests/s (higher is better)", "{:,.0f}"),
                (a2, "p99_ms", "p99 latency ms (lower is better)", "{:.2f}"),
                (a3, "cpu_s_per_10k", "CPU s per 10k requests (lower is better)", "{:.3f}")):
            ns = [n for n in names if r[n].get(key) is not None]
            bars = ax.bar([SHORT.get(n, n) for n in ns], [r[n][key] for n in ns],
                          color=[COLOR[n] for n in ns])
            for b in bars:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                        fmt.format(b.get_height()), ha="center", va="bottom", fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle("Proxy overhead: tiny requests, one worker thread each", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "overhead.png"), dpi=110)
        plt.close(fig)
        made.append("overhead.png")
    if que:
        r = que["data"]["results"]
        names = list(r)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
        n = que["data"]["setup"]["queued"]
        for ax, key, title in ((a1, "kib_per_queued_request", "KiB RSS per queued request"),
                               (a2, "drain_s", f"drain time s ({n:,} queued, 16 slots)")):
            bars = ax.bar([LABEL[n] for n in names], [r[n][key] for n in names],
                          color=[COLOR[n] for n in names])
            for b in bars:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{b.get_height():.3g}",
                        ha="center", va="bottom", fontsize=8)
            ax.set_title(title, fontsize=9)
        if "kib_per_queued_request" in r.get("lb-agent", {}):
            a1.axhline(4, color="black", lw=0.8, ls="--")
            a1.text(-0.4, 4, "target 4 KiB", va="bottom", fontsize=7)
        fig.suptitle("Queue scale (lower is better)", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "queue.png"), dpi=110)
        plt.close(fig)
        made.append("queue.png")
    return made



# --- replicas (issue #12) ---------------------------------------------------------------------

REP_LABEL = {"one": "1 lb-agent (in-process ledger)", "redis": "3 lb-agents, one Redis ledger",
             "haproxy": "3 HAProxy (maxconn per instance)",
             "partitioned": "3 lb-agents, pods split among them (Knative model)"}
REP_SHORT = {"one": "1 agent", "redis": "3 agents\nRedis", "haproxy": "3 HAProxy",
             "partitioned": "3 agents\npartitioned"}
REP_COLOR = {"one": "#d95f02", "redis": "#e6ab02", "haproxy": "#1b9e77", "partitioned": "#7570b3"}


def replicas_target_rows(rep):
    s, lat, runs = rep["data"]["summary"], rep["data"]["latency"], rep["data"].get("runs", {})
    caps = sum(r["cap_violations"] for r in s["redis"].values())
    worst = max(max(r["max_inflight_per_pod"]) for r in s["redis"].values())

    def vs_one(workload):
        """3 agents' efficiency ÷ one agent's on `workload`, per repetition (the contenders of
        a repetition ran in turn), as a [lowest, highest] span (the medians' ratio when the
        file has no runs)."""
        vs = s["redis"][workload]["vs_one"]
        ratios = [a["efficiency"] / b["efficiency"]
                  for a, b in zip(runs.get("redis", {}).get(workload, []),
                                  runs.get("one", {}).get(workload, []))
                  if a["efficiency"] is not None and b["efficiency"]]
        return vs, ([min(ratios), max(ratios)] if ratios
                    else None if vs is None else [vs, vs])

    def vs_one_row(workload):
        vs, span = vs_one(workload)
        return (f"{workload} efficiency with 3 agents ≥ 0.97 of one agent's (every run)",
                f"{f(s['redis'][workload]['efficiency'])} vs {f(s['one'][workload]['efficiency'])} "
                f"({f(vs)}× on the medians; per run {rng(span)}×)",
                False if span is None else meets(span, 0.97, True))

    # The Redis agent's p99 minus the in-process one's in each latency round.
    added = [a["p99_ms"] - b["p99_ms"]
             for a, b in zip(lat["redis"].get("rounds", []), lat["in-process"].get("rounds", []))]
    added_span = [min(added), max(added)] if added else [lat["added_p99_ms"]] * 2
    return [
        ("0 cap violations with 3 agents (Redis ledger, all runs)",
         f"{caps} (highest in flight on a pod: {worst}, limit {rep['data']['setup']['limit']})",
         caps == 0),
        vs_one_row("burst"),
        vs_one_row("hetero"),
        ("ledger's added latency per request ≤ 1 ms p99 (loopback, every round)",
         f"p99 +{lat['added_p99_ms']:.3f} ms over all requests (per round "
         f"{added_span[0]:+.3f} to {added_span[1]:+.3f} ms; p50 +{lat['added_p50_ms']:.3f} ms)",
         meets(added_span, 1.0, False)),
    ]


def replicas_md(d):
    s, summ, lat = d["data"]["setup"], d["data"]["summary"], d["data"]["latency"]
    out = [f"### Several replicas ({s['pods']} pods × limit {s['limit']}, each pod works on "
           f"{s['pod_workers']} at a time; client picks a replica at random per request; "
           f"median of {s['reps']} runs)", "", when(d), "",
           "| workload | contender | makespan s (range) | ideal s | efficiency | vs 1 agent | "
           "failed | p50 ms | p99 ms | max in flight per pod | cap violations |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in ["burst", "hetero"]:
        for c, per in summ.items():
            r = per[w]
            rng = r["makespan_range_s"]
            out.append(
                f"| {w} | {REP_LABEL[c]} | {r['makespan_s']:.3f} ({rng[0]:.3f}–{rng[1]:.3f}) | "
                f"{r['ideal_makespan_s']:.3f} | {f(r['efficiency'])} | "
                f"{f(r['vs_one'], '{:.3f}')} | {r['failed']}/{r['requests']} | "
                f"{f(r['p50_ms'], '{:.0f}')} | {f(r['p99_ms'], '{:.0f}')} | "
                f"{'·'.join(str(v) for v in r['max_inflight_per_pod'])} | "
                f"{r['cap_violations']} |")
    out += ["", f"Workloads: **burst** {s['requests']} × 200 ms at once (ideal "
            f"ceil({s['requests']}/{s['pods'] * s['limit']}) × 200 ms); **hetero** "
            f"{s['requests']} requests at once, 20–1500 ms (Σ {s['hetero_total_service_s']:.1f} "
            f"s; ideal = lower bound max(Σ/{s['pods'] * s['limit']}, longest)). Each request "
            "goes to a replica drawn at random (seeded; the same draws for every contender of a "
            "run), as a ClusterIP Service in front of the replicas would send it. The 3 HAProxy "
            "instances each have `maxconn "
            f"{s['limit']}` per server and `balance leastconn`; the partitioned model gives each "
            f"of 3 lb-agents {s['pods'] // s['replicas']} of the pods. Max in flight per pod: "
            "each pod's own highest count over all runs (pods 1…" f"{s['pods']}" "); cap "
            "violations: pods above the limit, summed over runs. Efficiency = ideal / measured "
            "makespan; vs 1 agent = efficiency / the single agent's.", "",
            f"**Added latency of the Redis ledger**: {s['latency_rounds']} rounds × "
            f"{s['latency_requests_per_round']} sequential `GET /work?ms=0` on one keep-alive "
            f"connection (after {s['latency_warmup']} unmeasured), through one agent with the "
            "Redis ledger and the same agent without it, rounds interleaved; percentiles over "
            "all measured requests (client's round trip).", "",
            "| ledger | p50 ms | p99 ms | mean ms | requests |", "|---|---|---|---|---|"]
    for k in ("in-process", "redis"):
        r = lat[k]
        out.append(f"| {k} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | "
                   f"{r['requests']} |")
    out.append(f"| **added by Redis** | **{lat['added_p50_ms']:+.3f}** | "
               f"**{lat['added_p99_ms']:+.3f}** | "
               f"{lat['redis']['mean_ms'] - lat['in-process']['mean_ms']:+.3f} | |")
    out.append("")
    if lat.get("ledger_calls_per_request") is not None:
        out += [f"The Redis agent's own `lb_ledger_round_trip_seconds`: "
                f"{lat['ledger_calls_per_request']:.2f} ledger calls per request (take + "
                f"release, and lease renewals), {lat['ledger_round_trip_mean_ms']:.3f} ms per "
                "call on average.", ""]
    first = d["data"].get("fresh_ledger_first_request_s")
    if first is not None:
        out += [f"On a fresh (empty) Redis the first request took **{first:.2f} s**: an empty "
                "Redis is a new ledger epoch, and the agents grant nothing for 2 s after one so "
                "that the replicas of a restarted Redis can re-assert their leases. The runs "
                "above come after it (steady state).", ""]
    return out


def replicas_plot(rep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, setup = rep["data"]["summary"], rep["data"]["setup"]
    names = list(s)
    wls = ["burst", "hetero"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(names)
    for i, c in enumerate(names):
        xs = [j + i * width for j in range(len(wls))]
        vals = [s[c][w]["efficiency"] or 0 for w in wls]
        bars = a1.bar(xs, vals, width, label=REP_LABEL[c], color=REP_COLOR[c])
        for b in bars:
            a1.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01,
                    f"{b.get_height():.2f}", ha="center", va="bottom", fontsize=7)
    a1.axhline(1.0, color="black", lw=0.8, ls="--")
    a1.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(wls))], wls)
    a1.set_ylim(0, 1.15)
    a1.set_ylabel("efficiency (ideal / measured)")
    a1.set_title("efficiency (higher is better)", fontsize=9)
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    worst = [max(max(s[c][w]["max_inflight_per_pod"]) for w in wls) for c in names]
    bars = a2.bar([REP_SHORT[c] for c in names], worst, color=[REP_COLOR[c] for c in names])
    for b in bars:
        a2.text(b.get_x() + b.get_width() / 2, b.get_height(), str(int(b.get_height())),
                ha="center", va="bottom", fontsize=8)
    a2.axhline(setup["limit"], color="black", lw=0.8, ls="--")
    a2.text(len(names) - 0.5, setup["limit"], f"limit {setup['limit']}", va="bottom",
            ha="right", fontsize=7)
    a2.set_title("highest in flight on any pod (pods' own counts)", fontsize=9)
    a2.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Several replicas: {setup['pods']} pods × limit {setup['limit']}, client "
                 "picks a replica at random", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "replicas.png"), dpi=110)
    plt.close(fig)
    return ["replicas.png"]


def render():
    bal, h2, ovh, que, sel = (load(n) for n in ("balance", "h2", "overhead", "queue",
                                                "selection"))
    machine = load("machine")
    rep = load("replicas")
    pngs = plots(bal, ovh, que, h2)
    if rep:
        pngs += replicas_plot(rep)
    lines = []
    page = load("page")
    aj = load("asyncjobs")
    rq = load("reqpath")
    lines += targets_md(bal, ovh, que, h2, rep=rep, page=page, aj=aj)
    lines += contenders_md({"balance": bal, "h2": h2, "overhead": ovh, "queue": que,
                            "selection": sel, "replicas": rep, "page": page, "asyncjobs": aj,
                            "reqpath": rq})
    if machine:
        lines += machine_md(machine)
    if bal:
        lines += balance_md(bal) + ["![balance](results/balance.png)", ""]
    if h2:
        lines += h2_md(h2) + ["![h2](results/h2.png)", ""]
    if ovh:
        lines += overhead_md(ovh) + ["![overhead](results/overhead.png)", ""]
    if que:
        lines += queue_md(que) + ["![queue](results/queue.png)", ""]
    if sel:
        lines += selection_md(sel)
    if rep:
        lines += replicas_md(rep) + ["![replicas](results/replicas.png)", ""]
    if page:
        lines += page_md(page)
    if aj:
        lines += asyncjobs_md(aj)
    if rq:
        lines += reqpath_md(rq)
    body = "\n".join(lines)
    with open(os.path.join(RESULTS, "latest.md"), "w") as fh:
        fh.write("# lb-agent bench: latest results\n\n"
                 + body.replace("](results/", "](") + "\n")
    if os.path.exists(README):
        with open(README) as fh:
            text = fh.read()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            with open(README, "w") as fh:
                fh.write(head + BEGIN + "\n" + body + "\n" + END + tail)
    return pngs


# --- page (issue 19: open live pages must not show in the proxy's req/s) -------------------


def rng(r, fmt="{:.3f}"):
    return "—" if not r else f"{fmt.format(r[0])}–{fmt.format(r[1])}"


def page_verdict(d):
    """The page part's verdict, computed from its results file by the rule of page.py (also for
    a file written under an older rule)."""
    from .page import verdict

    s = d["data"]["summary"]
    return verdict(s["ratio"]["rps"], s["ratio"]["cpu_s_per_10k"], s["a"].get("rps_spread"),
                   s["b"].get("rps_spread"), s.get("direct_core_share"))


def page_target_row(d):
    setup = d["data"]["setup"]
    v = page_verdict(d)
    return (f"{setup['pages']} open live pages do not show in the proxy's req/s (every round's "
            "b/a ≥ 0.98 for req/s, ≤ 1.02 for CPU per request; direct cost < 1 % of a core)",
            v["why"], v["met"])


def page_md(d):
    s, setup, rounds = d["data"]["summary"], d["data"]["setup"], d["data"]["rounds"]
    polls = ", ".join(f"`{p}` every {ms / 1000:g} s" for p, ms in setup["polls_ms"].items())
    changed = {p: ms for p, ms in setup["polls_ms"].items() if setup["page_polls_ms"].get(p) != ms}
    label = {"a": "a: no page open", "b": f"b: {setup['pages']} pages open"}
    out = [f"### Live page: {setup['pages']} open pages against the proxy's req/s (wrk, 1 "
           f"thread, {setup['connections']} keep-alive connections, {setup['duration_s']} s × "
           f"{setup['rounds']} rounds per condition, median; lb-agent `threads: 1` pinned to CPU "
           f"{setup['pinning']['proxy']}, wrk + pods + pages to CPU {setup['pinning']['load']})",
           "", when(d)
           + (f" Machine: {d['meta']['machine']['cpu']}, {d['meta']['machine']['cores']} cores "
              "(this part's own run; the Machine section above is that of the older parts)."
              if d.get("meta", {}).get("machine") else ""), "",
           "| condition | req/s (range) | CPU s per 10k req (range) | p50 ms | p99 ms (range) | "
           "lb-agent CPU (cores) | admin threads (cores) | pages process (cores) | errors | other "
           "processes (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in ("a", "b"):
        r = s[c]
        out.append(
            f"| {label[c]} | {r['rps']:.0f} ({rng(r['rps_range'], '{:.0f}')}) | "
            f"{f(r['cpu_s_per_10k'])} ({rng(r['cpu_s_per_10k_range'])}) | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} ({rng(r['p99_ms_range'], '{:.2f}')}) | "
            f"{r['lb_core_share']:.2f} | {f(r['admin_cores'], '{:.4f}')} | "
            f"{r['pages_process_cores']:.3f} | {r['errors']} | "
            f"{r['other_cores']:.2f} |")
    ra = s["ratio"]
    out.append(f"| **b ÷ a** | **{ra['rps']['median']:.3f}×** ({rng(ra['rps']['range'])}) | "
               f"{ra['cpu_s_per_10k']['median']:.3f}× ({rng(ra['cpu_s_per_10k']['range'])}) | | "
               f"{ra['p99_ms']['median']:.3f}× ({rng(ra['p99_ms']['range'])}) | | | | | |")
    out += ["", "Round by round (order of the two conditions in brackets): "
            + "; ".join(f"{i + 1} ({r['order']}) {r['a']['rps']:.0f} → {r['b']['rps']:.0f} req/s "
                        f"= {r['ratio']['rps']:.3f}×, CPU {r['ratio']['cpu_s_per_10k']:.3f}×"
                        for i, r in enumerate(rounds)) + ".", "",
            "| page fetch | served in the measured windows | expected from the page's period | "
            "failed | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|"]
    for p, r in s["page_fetches"].items():
        out.append(f"| `GET {p}` | {r['served']} | {r['expected']:.0f} | {r['failed']} | "
                   f"{f(r['p50_ms'])} | {f(r['p99_ms'])} | {f(r['max_ms'])} |")
    v = page_verdict(d)
    word = {True: "met", None: "tie", False: "not met"}[v["met"]]
    out += ["", f"**Verdict: {word}**: {v['why']}. Rule: met when every round's b/a is at "
            "least 0.98 for req/s and at most 1.02 for lb-agent's CPU per request, and the "
            "pages' direct cost (admin CPU per fetch × fetches per second) is under 1 % of a "
            "core; not met when every round misses 0.98 for req/s or 1.02 for CPU per request, "
            "or the direct cost is 1 % or more; otherwise a tie (rounds on either side of the "
            "target: more rounds needed).", "",
            f"Each simulated page (`bench/benchkit/pages.py`) does what `{setup['page_source']}` "
            f"does in a browser, read from the page itself: it loads `/`, then fetches {polls} "
            "(each at once on opening, then by `setInterval`), on keep-alive connections, with a "
            "browser's headers, and checks every answer; the pages open spread over the first "
            "second. "
            + (f"Periods changed from the page's by BENCH_PAGE_POLL_MS: {changed}. " if changed else "")
            + "Every round starts a fresh lb-agent for each condition, in front of "
            f"{setup['pods']} fake pods answering at once (cap far above the load). CPU per 10k "
            "requests is all of lb-agent's threads, the admin ones included; admin threads: the "
            "CPU of lb-agent's `admin` service threads, the pages' direct cost"
            + (f" ({s['admin_cpu_ms_per_fetch']:.3f} ms of CPU per page fetch)"
               if s.get("admin_cpu_ms_per_fetch") is not None else "")
            + ". lb-agent's CPU near 1.00 core means lb-agent was the bottleneck, so a cost of the "
            "pages would show in req/s; well below it, it shows in CPU per request only. The "
            "pages process runs on the load generator's CPU: its own CPU is in its column.", ""]
    return out


# --- asyncjobs (issue 17: a job holds its pod's slot until it is done) ---------------------

AJ_LB = ("lb-agent", "lb-agent-checks")


def asyncjobs_target_rows(d):
    s, setup = d["data"]["summary"], d["data"]["setup"]
    lb = [s[c] for c in AJ_LB if c in s]
    if not lb:
        return []
    held = max(r["max_running"] for r in lb)
    wrong = sum(r["client_polls_404"] for r in lb)
    polls = sum(r["client_polls"] for r in lb)
    seen = sum(r["jobs_seen_done"] for r in lb)
    jobs = sum(r["jobs"] for r in lb)
    rows = [(f"async jobs: each pod's own count of held jobs never above the limit "
             f"({setup['limit']})", f"highest {held}, {sum(r['cap_violations'] for r in lb)} "
             "violations", held <= setup["limit"]),
            ("async jobs: every client poll reaches the job's own pod",
             f"{polls - wrong}/{polls} polls; jobs seen done {seen}/{jobs}",
             wrong == 0 and seen == jobs)]
    if "haproxy" in s and s["lb-agent"]["efficiency"] is not None:
        lo, ha = s["lb-agent"]["efficiency_range"], s["haproxy"]["efficiency"]
        hr = span(s["haproxy"], "efficiency")
        verdict = True if ha is None else beats(lo, hr, True)
        rows.append(("async jobs: makespan efficiency above HAProxy's",
                     f"lb-agent {f(s['lb-agent']['efficiency'])} ({rng(lo)}), HAProxy {f(ha)} "
                     f"({rng(s['haproxy']['efficiency_range'])})", verdict))
    return rows


def asyncjobs_md(d):
    s, setup = d["data"]["summary"], d["data"]["setup"]
    out = [f"### Asynchronous jobs: {setup['jobs']} jobs of {min(setup['job_ms'])}–"
           f"{max(setup['job_ms'])} ms ({setup['total_work_s']:.1f} s of work) submitted at once "
           f"to {setup['pods']} pods × limit {setup['limit']} (each pod works on "
           f"{setup['pod_workers']} job at a time), median of {setup['reps']} reps", "", when(d),
           "",
           "| contender | makespan s (range) | lower bound s | efficiency (range) | max jobs held "
           "on a pod | jobs per pod (min–max) | client polls at a pod without the job | jobs "
           "the client saw done | failed submissions |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c, r in s.items():
        out.append(
            f"| {r['label']} | {r['makespan_s']:.2f} ({rng(r['makespan_range_s'], '{:.2f}')}) | "
            f"{r['ideal_makespan_s']:.2f} | {f(r['efficiency'])} ({rng(r['efficiency_range'])})"
            f" | {r['max_running']} | {r['jobs_per_pod_spread'][0]}–"
            f"{r['jobs_per_pod_spread'][1]} | {r['client_polls_404']} of {r['client_polls']} | "
            f"{r['jobs_seen_done']} of {r['jobs']} | {r['failed_submissions']} |")
    out += ["", "Held: accepted by the pod and not finished (the pod's own count; a job waiting "
            "inside the pod for its one worker counts). Makespan: the first submission to the "
            "pods' last finished job. A client stops polling at its first `404` (its job is "
            "unknown where its poll landed). The lower bound is the work spread evenly over "
            "every pod, or the longest job; no scheduler finishes sooner. "
            "`bench/benchkit/asyncjobs.py`.", ""]
    return out


# --- reqpath (lb-agent's own cost per request, step by step, under callgrind) --------------


def short_sym(name):
    """`pingora_proxy::HttpProxy<SV,C>::upstream_filter::{{closure}}` → `HttpProxy::
    upstream_filter`, for the notes."""
    name = name.replace("::{{closure}}", "")
    name = re.sub(r"^<([^<>]*(?:<[^<>]*>[^<>]*)*) as [^>]*(?:<[^<>]*>[^<>]*)*>::", r"\1::", name)
    name = re.sub(r"<[^<>]*>", "", name)
    parts = name.split("::")
    return "::".join(parts[-2:])


def reqpath_cell(r):
    if r is None:
        return "—"
    how, ir = r["how"], r.get("ir")
    if ir is None:
        return f"{how.replace('inlined, ', 'inlined (')})" if "," in how else how
    if how == "not called":
        return "0 (not called)"
    if how == "inlined, none found":
        return "0 (none ran)"
    out = f"{ir:,.0f}" + (" (inlined)" if how == "inlined" else "")
    if r.get("uncertain_ir_per_request", 0) >= 1:
        out += f" +≈{r['uncertain_ir_per_request']:,.0f}?"
    return out


def reqpath_note(st):
    bits = [st["note"]] if st["note"] else []
    for side, who in (("lb-agent", "lb-agent"), ("pingora", "bare")):
        r = st.get(side)
        if not r:
            continue
        if r["how"] == "symbol" and r["calls_per_request"]:
            extra = f"{r['calls_per_request']:.2f} calls"
            if r["inlined_ir_per_request"] >= 1:
                extra += (f", +{r['inlined_ir_per_request']:,.0f} inlined into "
                          f"{short_sym(r['inlined_into'][0]['symbol'])}")
            bits.append(f"{who}: {extra}")
        elif r["how"] == "inlined" and r["inlined_into"]:
            bits.append(f"{who}: inlined into "
                        + ", ".join(short_sym(x["symbol"]) for x in r["inlined_into"][:2]))
        elif r.get("why"):
            bits.append(f"{who}: {r['why']}")
    return "; ".join(bits)


def reqpath_md(d):
    data, s = d["data"], d["data"]["setup"]
    lb, bare = data["results"]["lb-agent"], data["results"]["pingora"]
    out = [f"### Request path cost per step (callgrind: {s['requests']} keep-alive `GET /` on "
           f"{s['connections']} connections after {s['warmup']} unmeasured; user-space "
           "instructions per request)", "", when(d), "",
           f"Binaries: lb-agent built {lb['binary']['built']}, bare Pingora built "
           f"{bare['binary']['built']}; {floor_alike(d)}.", "",
           "| step | lb-agent Ir/request | bare Pingora Ir/request | note |", "|---|---|---|---|"]
    ex = data["excess_ir_per_request"]
    out.append(f"| **total, every thread** | **{lb['ir_per_request']:,.0f}** | "
               f"**{bare['ir_per_request']:,.0f}** | lb-agent's own: **{ex:+,.0f}** "
               f"({lb['ir_per_request'] / bare['ir_per_request']:.2f}×) |")
    out.append(f"| the thread serving the requests | {lb['request_threads_ir_per_request']:,.0f} "
               f"| {bare['request_threads_ir_per_request']:,.0f} | "
               f"{data['excess_request_threads_ir_per_request']:+,.0f}; the steps below are read "
               "there |")
    out.append(f"| other threads | {lb['other_threads_ir_per_request']:,.0f} | "
               f"{bare['other_threads_ir_per_request']:,.0f} | Pingora's timer clock, lb-agent's "
               "admin and others: they run by the clock, so per request they grow with the run's "
               "length (slow under callgrind) |")
    for st in data["steps"]:
        label = st["label"]
        depth = (len(label) - len(label.lstrip(" "))) // 2
        out.append(f"| {'&emsp;' * depth}{label.strip()} | {reqpath_cell(st['lb-agent'])} | "
                   f"{reqpath_cell(st['pingora'])} | {reqpath_note(st)} |")
    sc = data.get("syscalls", {})
    out += ["", "Rows overlap: an indented row is part of the row above it, and the request task "
            "contains every callback. A step's cost is the inclusive cost of its symbols (the "
            "dump merged by symbol: LTO's pieces of one function counted as one), plus its code "
            "inlined into other symbols, found by the inline chain the binary's debug info gives "
            "each instruction (`inlined`: no symbol of its own is left). `+≈N?`: code at lines it "
            "shares with other inlined code in one symbol, estimated by instruction counts and "
            "not counted. `0 (none ran)`: no symbol, and no instruction inlined from it ran. `—`: not in "
            "that binary.", ""]
    lbs, bares = sc.get("lb-agent", {}), sc.get("pingora", {})
    if "per_request" in lbs and "per_request" in bares:
        names = sorted(set(lbs["per_request"]) | set(bares["per_request"]),
                       key=lambda k: -(lbs["per_request"].get(k, 0) + bares["per_request"].get(k, 0)))
        out += [f"Syscalls per request (`strace -f -c` on every thread, {lbs['requests']} requests "
                "run natively after the same warm-up; strace slows the run, so the clock-driven "
                "ones, `clock_nanosleep` and `epoll_wait` timeouts, weigh more than without it):",
                "", "| syscall | lb-agent per request | bare Pingora per request |",
                "|---|---|---|"]
        rare = [k for k in names if max(lbs["per_request"].get(k, 0),
                                        bares["per_request"].get(k, 0)) < 0.005]
        for k in names:
            if k not in rare:
                out.append(f"| `{k}` | {lbs['per_request'].get(k, 0):.2f} | "
                           f"{bares['per_request'].get(k, 0):.2f} |")
        if rare:
            out.append(f"| others ({', '.join(f'`{k}`' for k in rare)}) | "
                       f"{sum(lbs['per_request'].get(k, 0) for k in rare):.3f} | "
                       f"{sum(bares['per_request'].get(k, 0) for k in rare):.3f} |")
        out.append(f"| **total** | **{lbs['total_per_request']:.2f}** | "
                   f"**{bares['total_per_request']:.2f}** |")
        out.append("")
    else:
        why = lbs.get("skipped") or bares.get("skipped") or "not recorded"
        out += [f"Syscalls per request: not counted ({why}).", ""]
    diff = data.get("self_diff")
    if diff:
        out += ["<details><summary>Symbols whose own (exclusive) cost differs most, per request, "
                "on the serving thread</summary>", "",
                "| symbol | lb-agent | bare Pingora |", "|---|---|---|"]
        out += [f"| `{r['symbol'][:120]}` | {r['lb-agent']:,.0f} | {r['pingora']:,.0f} |"
                for r in diff]
        out += ["", "</details>", ""]
    return out
