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
