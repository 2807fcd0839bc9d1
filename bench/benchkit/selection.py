"""Scenario 4, selection cost: the criterion micro-benchmark bench/selection.rs
(`cargo bench --bench selection`), pick + release with 10, 100 and 1,000 pods."""

import json
import os
import subprocess

from .contenders import ROOT
from .procs import BenchError

SIZES = [10, 100, 1000]
STATES = ["idle", "mixed"]


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
            path = os.path.join(ROOT, "target", "criterion", "pick_release", state, str(n),
                                "new", "estimates.json")
            with open(path) as f:
                est = json.load(f)
            r = {
                "mean_ns": est["mean"]["point_estimate"],
                "mean_ci_ns": [est["mean"]["confidence_interval"]["lower_bound"],
                               est["mean"]["confidence_interval"]["upper_bound"]],
                "median_ns": est["median"]["point_estimate"],
            }
            results[f"{state}/{n}"] = r
            log(f"selection {state:5} {n:5} pods: {r['mean_ns'] / 1000:.2f} µs per pick + release")
    return {"setup": {"limit": 4, "sizes": SIZES, "states": STATES}, "results": results}
