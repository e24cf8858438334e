"""Draw benchmarks/hot_path.png from the JSON that ``run.py --json`` wrote.

    python benchmarks/run.py --only hot_path --json results.json
    python benchmarks/chart.py results.json [-o benchmarks/hot_path.png]

Grouped bars: one group per payload size, one bar per contender, the median
round-trip time (encrypt + decrypt) in microseconds on a log scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CONTENDERS = [
    ("raw AES-GCM, buffered nonces", "raw AES-GCM, buffered nonces (floor)", "#4d4d4d"),
    ("raw AES-GCM, os.urandom nonces", "raw AES-GCM, os.urandom nonces", "#8c8c8c"),
    ("kms_async [sqlite]", "kms_async (SQLite)", "#1f77b4"),
    ("kms_async [postgres]", "kms_async (PostgreSQL)", "#4fa3e0"),
    ("kms_async Wrapper", "kms_async Wrapper", "#9ecae1"),
    ("Tink AEAD", "Tink AEAD", "#2ca02c"),
    ("Fernet", "Fernet", "#ff7f0e"),
    ("MultiFernet", "MultiFernet", "#ffbb78"),
    ("AWS ESDK (caching)", "AWS Encryption SDK (caching CMM)", "#9467bd"),
    ("Go-design imitation [sqlite]", "Go design imitation (sqlite3)", "#d62728"),
    ("Go-design imitation [postgres]", "Go design imitation (libpq)", "#f08080"),
]


def _size_label(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20} MiB"
    if size >= 1 << 10:
        return f"{size >> 10} KiB"
    return f"{size} B"


def draw(results_path: str, out_path: str) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no chart drawn"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_path) as f:
        data = json.load(f)
    times: dict[str, dict[int, float]] = {}
    for fig in data["figures"]:
        d = fig.get("data", {})
        if fig["target"] == "hot_path" and d.get("kind") == "time" and fig["value"] is not None:
            times.setdefault(d["contender"], {})[d["size"]] = fig["value"]
    if not times:
        return f"{results_path} holds no hot_path figures; run run.py with hot_path and --json"
    sizes = sorted({s for per in times.values() for s in per})
    present = [c for c in CONTENDERS if c[0] in times]

    fig, ax = plt.subplots(figsize=(12, 5.8), dpi=110)
    width = 0.8 / len(present)
    for i, (key, label, color) in enumerate(present):
        xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(sizes))]
        ys = [times[key].get(s, float("nan")) for s in sizes]
        bars = ax.bar(
            xs, ys, width * 0.92, label=label, color=color, edgecolor="white", linewidth=0.4
        )
        if key.startswith(("raw", "kms_async [")):
            for bar, y in zip(bars, ys, strict=True):
                ax.annotate(
                    f"{y:.1f}" if y < 100 else f"{y:.0f}",
                    (bar.get_x() + bar.get_width() / 2, y),
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_yscale("log")
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([_size_label(s) for s in sizes])
    ax.set_xlabel("payload size")
    ax.set_ylabel("encrypt + decrypt round trip, µs (log scale)")
    meta = data.get("meta", {})
    ax.set_title(
        "kms_async hot path vs raw AES-GCM and peers (cached keys, one process)\n"
        f"{meta.get('nproc', '?')} CPUs {meta.get('cpu', '')}, Python {meta.get('python', '?')}, "
        f"cryptography {meta.get('cryptography', '?')}; medians of interleaved rounds",
        fontsize=10,
    )
    ax.grid(axis="y", which="both", alpha=0.25)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncol=2, loc="upper left", frameon=False)
    top = max(v for per in times.values() for v in per.values())
    ax.set_ylim(top=top * 8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out_path)
    plt.close(fig)
    return f"wrote {out_path}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", help="JSON written by run.py --json")
    parser.add_argument("-o", "--out", default=os.path.join(HERE, "hot_path.png"))
    args = parser.parse_args()
    print(draw(args.results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
