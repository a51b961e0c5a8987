#!/usr/bin/env python3
"""Draws the cost curves as PNG files in docs/, log-log, with a linear reference line
through the first point so a curve bending worse than linear shows at a glance. Reads
what these wrote into target/ (a missing input skips its plot):
- `cargo bench -p edgeproxy --bench scale`: scale.csv, scale-decisions.csv;
- `cargo bench -p edgeproxy --bench bindings`: bindings.csv;
- `TESTS=idle-scale bench/compare.sh`: compare-results.jsonl.

    pip install matplotlib && python3 bench/plot_scale.py
"""
import csv, json, os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(name):
    with open(os.path.join(ROOT, "target", name)) as f:
        return list(csv.DictReader(f))


def save(fig, axes, xlabel, name):
    """Labels, grids and legends every axis, then writes docs/NAME."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs", name), dpi=90)


def exists(name):
    return os.path.exists(os.path.join(ROOT, "target", name))


def linear_ref(ax, xs, ys):
    ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ":", color="grey", label="linear from the first point")


def main():
    if exists("scale.csv"):
        table_plots()
    if exists("bindings.csv"):
        bindings_plot()
    if exists("compare-results.jsonl"):
        idle_plot()


def bindings_plot():
    b = rows("bindings.csv")
    n = [int(r["bindings"]) for r in b]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    mem = [int(r["bindings"]) * float(r["bytes_per_binding"]) / 1e6 for r in b]
    axes[0].loglog(n, mem, "o-", label="held (MB)")
    linear_ref(axes[0], n, mem)
    axes[0].set_title("bindings: memory held (MB)")
    for key, label in [("sweep_none_ms", "sweep, none expired"), ("sweep_half_ms", "sweep, half expired")]:
        axes[1].loglog(n, [float(r[key]) for r in b], "o-", label=label)
    linear_ref(axes[1], n, [float(r["sweep_none_ms"]) for r in b])
    axes[1].set_title("GC sweep (ms)")
    save(fig, axes, "bindings", "scale-bindings.png")


def idle_plot():
    with open(os.path.join(ROOT, "target", "compare-results.jsonl")) as f:
        res = [json.loads(line) for line in f]
    res = [r for r in res if r["test"].startswith("idle-")]
    if not res:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for proxy in dict.fromkeys(r["proxy"] for r in res):
        mine = sorted((int(r["test"][5:]), r["result"]) for r in res if r["proxy"] == proxy)
        n = [c for c, _ in mine]
        axes[0].semilogx(n, [r["bytes_per_conn"] for _, r in mine], "o-", label=proxy)
        axes[1].loglog(n, [r["open_s"] for _, r in mine], "o-", label=proxy)
    axes[0].set_title("user-space bytes per idle connection")
    axes[1].set_title("time to open them, 64 at a time (s)")
    save(fig, axes, "idle connections through one POP", "scale-idle.png")


def table_plots():
    table = rows("scale.csv")
    n = [int(r["rows"]) for r in table]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = [
        ("reload (ms)", [float(r["reload_ms"]) for r in table]),
        ("snapshot + policy's copy (MB)",
         [(int(r["snapshot_bytes"]) + int(r["wit_bytes"])) / 1e6 for r in table]),
        ("set-table per instance (us)", [float(r["set_table_us"]) if r["set_table_us"] else None for r in table]),
    ]
    for ax, (label, ys) in zip(axes, series):
        # A size where the policy faulted has no set-table time: left out, and said.
        xs = [x for x, y in zip(n, ys) if y is not None]
        ys = [y for y in ys if y is not None]
        ax.loglog(xs, ys, "o-", label=label)
        linear_ref(ax, xs, ys)
        if len(xs) < len(n):
            ax.annotate("larger tables exceed the\npolicy's default limits", xy=(0.35, 0.1), xycoords="axes fraction", fontsize=8)
        ax.set_title(label)
    save(fig, axes, "backends in the routing table", "scale-table.png")

    dec = rows("scale-decisions.csv")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for size in sorted({int(r["rows"]) for r in dec}):
        sub = [r for r in dec if int(r["rows"]) == size]
        k = [int(r["candidates"]) for r in sub]
        ax.loglog(k, [float(r["wasm_ns"]) / 1e3 for r in sub], "o-", label=f"wasm, {size:,} backends")
        ax.loglog(k, [float(r["native_ns"]) / 1e3 for r in sub], "s--", label=f"native, {size:,} backends")
    ax.set_ylabel("one decision (us)")
    save(fig, [ax], "candidates of the app", "scale-decisions.png")


if __name__ == "__main__":
    main()
