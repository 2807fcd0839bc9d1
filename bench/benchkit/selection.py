"""Scenario 4, selection cost: the criterion micro-benchmark bench/selection.rs
(`cargo bench --bench selection`), pick + release with 10, 100 and 1,000 pods; and
release_with_queued_retries: 4 pods × limit 1, all busy, with 0, 1,000 and 10,000 queued
retries that tried pod 0, one iteration giving pod 0's slot back and taking it again."""

import json
import os
import subprocess

from .contenders import ROOT
from .procs import BenchError

SIZES = [10, 100, 1000]
STATES = ["idle", "mixed"]
QUEUED_RETRIES = [0, 1000, 10000]


def estimates(*group):
    """criterion's mean and median of one benchmark (target/criterion/<group…>/new)."""
    path = os.path.join(ROOT, "target", "criterion", *group, "new", "estimates.json")
    try:
        with open(path) as f:
            est = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"cargo bench wrote no estimate for {'/'.join(group)}: {e}")
    return {
        "mean_ns": est["mean"]["point_estimate"],
        "mean_ci_ns": [est["mean"]["confidence_interval"]["lower_bound"],
                       est["mean"]["confidence_interval"]["upper_bound"]],
        "median_ns": est["median"]["point_estimate"],
    }


def run(workdir, log):
    argv = ["cargo", "bench", "--bench", "selection", "--",
            "--warm-up-time", "1", "--measurement-time", "3", "--noplot"]
    log_path = os.path.join(workdir, "cargo-bench.log")
    with open(log_path, "w") as f:
        p = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if p.returncode != 0:
        with open(log_path) as f:
            raise BenchError(f"cargo bench failed:\n{f.read()[-3000:]}")
    results = {}
    for state in STATES:
        for n in SIZES:
            r = estimates("pick_release", state, str(n))
            results[f"{state}/{n}"] = r
            log(f"selection {state:5} {n:5} pods: {r['mean_ns'] / 1000:.2f} µs per pick + release")
    for n in QUEUED_RETRIES:
        r = estimates("release_with_queued_retries", str(n))
        results[f"release_with_queued_retries/{n}"] = r
        log(f"selection release with {n:5} queued retries: {r['mean_ns'] / 1000:.2f} µs")
    return {"setup": {"limit": 4, "sizes": SIZES, "states": STATES,
                      "queued_retries": QUEUED_RETRIES}, "results": results}
