#!/usr/bin/env python3
"""Plots BENCHMARKS.md's figures from loadtest CSV files (scripts/bench.sh --out DIR).

    scripts/plot-bench.sh   (installs matplotlib into .tmp/plot-venv, then runs this)
    python3 scripts/plot-bench.py docs/bench/plot

Reads DIR/*.csv (rows of `loadtest run --csv`; the file name is the system's label, e.g.
pgfanout.csv and socketio.csv) and writes:
  DIR/fanout-latency.png  deliveries/s against p50/p99 latency, per system
  DIR/fanout-cpu.png      node cores per 100k deliveries/s against deliveries/s
"""
import csv
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FANOUT = {"fanout", "fanout-api"}


def rows(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["scenario"] in FANOUT and float(r["deliveries"]) > 0]


def main(folder):
    folder = pathlib.Path(folder)
    systems = {p.stem: rows(p) for p in sorted(folder.glob("*.csv"))}
    systems = {k: v for k, v in systems.items() if v}
    if not systems:
        sys.exit(f"no fan-out rows in {folder}/*.csv")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rs in systems.items():
        for scenario in sorted({r["scenario"] for r in rs}):
            sel = sorted((r for r in rs if r["scenario"] == scenario), key=lambda r: float(r["deliveries_per_s"]))
            x = [float(r["deliveries_per_s"]) / 1000 for r in sel]
            ax.plot(x, [float(r["p99_ms"]) for r in sel], "o-", label=f"{name} {scenario} p99")
            ax.plot(x, [float(r["p50_ms"]) for r in sel], "x--", label=f"{name} {scenario} p50")
    ax.set_xlabel("deliveries/s (thousands)")
    ax.set_ylabel("latency, ms (log)")
    ax.set_yscale("log")
    ax.set_title("Fan-out: 2,000 connections, 20 channels × 100 subscribers, 2 nodes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "fanout-latency.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rs in systems.items():
        for scenario in sorted({r["scenario"] for r in rs}):
            sel = sorted((r for r in rs if r["scenario"] == scenario), key=lambda r: float(r["deliveries_per_s"]))
            x = [float(r["deliveries_per_s"]) / 1000 for r in sel]
            ax.plot(x, [float(r["node_cores_per_100k"]) for r in sel], "o-", label=f"{name} {scenario} nodes")
            ax.plot(x, [float(r["tool_cores_per_100k"]) for r in sel], "x:", label=f"{name} {scenario} load tool")
    ax.axhline(0.2, color="grey", linestyle="--", linewidth=1, label="target: 0.2 node cores")
    ax.set_xlabel("deliveries/s (thousands)")
    ax.set_ylabel("cores per 100k deliveries/s")
    ax.set_title("CPU per delivery (same machine, 2 cores)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "fanout-cpu.png", dpi=110)
    print(f"wrote {folder}/fanout-latency.png and {folder}/fanout-cpu.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/bench/plot")
