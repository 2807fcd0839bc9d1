"""Small statistics helpers and the ideal schedules the measurements are compared with."""

import heapq
import math


def pct(values, p):
    """p-th percentile (nearest rank) of a non-empty list."""
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, math.ceil(p / 100 * len(v)) - 1))
    return v[k]


def median(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def fcfs_on_slots(jobs, slots):
    """Completion times when `jobs` [(arrival_s, service_s)], taken in arrival order, each
    start on the earliest free of `slots` identical slots. For identical service times this is
    the best any scheduler can do (no request can finish earlier)."""
    free = [0.0] * slots
    heapq.heapify(free)
    done = []
    for arrival, service in sorted(jobs):
        t = max(arrival, heapq.heappop(free))
        heapq.heappush(free, t + service)
        done.append((arrival, t + service))
    return done


def makespan_lower_bound(services, slots):
    """No scheduler finishes a batch released at once sooner than this: the work spread evenly
    over every slot, or the longest single request."""
    return max(sum(services) / slots, max(services))


def pod_figures(stats, limit, slots, makespan_s):
    """What every balance-type part reports from the fake pods' own counters: the spread, the
    highest in-flight count per pod, busy time, utilisation of all slots over the makespan, and
    cap violations (pods whose own in-flight count went above `limit`)."""
    work_ms = sum(s["work_ms"] for s in stats)
    return {
        "requests_per_pod": [s["started"] for s in stats],
        "max_inflight": [s["max_inflight"] for s in stats],
        "busy_ms": [s["busy_ms"] for s in stats],
        "utilisation": work_ms / (slots * makespan_s * 1000),
        "cap_violations": sum(1 for s in stats if s["max_inflight"] > limit),
    }


# --- verdicts of the targets, from the ranges over repetitions --------------------------------
# Each is True (met), False (not met) or None (a tie: the repetitions do not decide it).


def meets(span, target, higher_is_better):
    """A figure's range over the repetitions, [lo, hi], against a fixed target: met when every
    repetition meets it, not met when none does, a tie when the range spans the target."""
    lo, hi = span
    if higher_is_better:
        return True if lo >= target else False if hi < target else None
    return True if hi <= target else False if lo > target else None


def beats(mine, other, higher_is_better):
    """lb-agent's range against another contender's: a tie when the two overlap, otherwise met
    when lb-agent's is the better side."""
    if mine[0] <= other[1] and other[0] <= mine[1]:
        return None
    return mine[0] > other[1] if higher_is_better else mine[1] < other[0]


def all_of(verdicts):
    """Several conditions of one target: not met if any is not met, met if all are, else a tie."""
    verdicts = list(verdicts)
    if False in verdicts:
        return False
    return True if all(v is True for v in verdicts) else None
