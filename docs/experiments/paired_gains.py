"""How sure a gain is: one method against another on the same slices of `calid evaluate`
reports (leave-one-out: each slice's heart PSNR/SSIM, ``*_per_slice``), with a bootstrap
interval that resamples what is correlated as a whole. In a real study, a slice position
over all its phases (the same anatomy 20 times); in the labelled stacks (the ED/ES patients),
a stack. Prints one JSON line per data set and pair of methods.

    python docs/experiments/paired_gains.py eval/paired/report.json \
        --pairs "[('calid-phases', 'flow-phases'), ('calid', 'flow')]"

``--against OTHER.json`` compares two weights on the same data: the other report's methods are
named ``against:METHOD`` in ``--pairs``, e.g. ``"[('calid', 'against:calid')]"``.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np


def cluster_gains(methods: dict, a: str, b: str, metric: str) -> list[np.ndarray]:
    """Per slice position (rows of phases), the gain of ``a`` over ``b``."""
    key = f"{metric}_per_slice"
    return [np.asarray(x) - np.asarray(y) for x, y in zip(methods[a][key], methods[b][key])]


def summary(clusters: list[np.ndarray], equal_clusters=False, resamples=10000, seed=0) -> dict:
    """Mean gain (over all items, or with ``equal_clusters`` the mean of the clusters' means, as
    `calid evaluate` averages stacks), the share of items and clusters above zero, and a 95 %
    percentile interval of that mean from resampling the clusters with replacement."""
    rng = np.random.default_rng(seed)
    sums, counts = np.array([c.sum() for c in clusters]), np.array([c.size for c in clusters])
    if equal_clusters:
        sums, counts = sums / counts, np.ones(len(clusters))
    draws = rng.integers(0, len(clusters), size=(resamples, len(clusters)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    items = np.concatenate([c.ravel() for c in clusters])
    return {
        "mean": float(sums.sum() / counts.sum()),
        "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "items": int(items.size),
        "items_above": float((items > 0).mean()),
        "clusters": len(clusters),
        "clusters_above": int(sum(c.mean() > 0 for c in clusters)),
    }


def merge(report: dict, other: dict) -> dict:
    """``report`` with the methods of ``other`` (the same studies and stacks) as ``against:METHOD``."""
    for section in ("real", "labelled_stacks"):
        for name, methods in report.get(section, {}).items():
            methods.update({f"against:{k}": v for k, v in other.get(section, {}).get(name, {}).items()})
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="calid evaluate's report.json files")
    parser.add_argument("--pairs", default="[('calid-phases', 'flow-phases'), ('calid', 'flow')]")
    parser.add_argument("--against", type=Path, help="another report of the same data (methods 'against:NAME')")
    args = parser.parse_args()
    for path in args.reports:
        report = json.loads(path.read_text())
        if args.against:
            report = merge(report, json.loads(args.against.read_text()))
        for a, b in ast.literal_eval(args.pairs):
            for metric in ("psnr_heart", "ssim_heart"):
                for study, methods in report["real"].items():
                    if a in methods and b in methods:
                        row = {"data": study, "clusters_are": "slice positions"}
                        row.update(pair=f"{a} - {b}", metric=metric, **summary(cluster_gains(methods, a, b, metric)))
                        print(json.dumps(row), flush=True)
                stacks = report.get("labelled_stacks", {})
                if stacks and all(a in m and b in m for m in stacks.values()):
                    # one cluster per stack: every slice and frame of one patient's stack
                    clusters = [np.concatenate(cluster_gains(m, a, b, metric)) for m in stacks.values()]
                    row = {"data": f"{len(stacks)} labelled stacks", "clusters_are": "stacks"}
                    row.update(pair=f"{a} - {b}", metric=metric, **summary(clusters, equal_clusters=True))
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
