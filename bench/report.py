#!/usr/bin/env python3
"""Merges bench.c's and sdpa.py's CSVs into one table (time, achieved
bandwidth, floor, ratio to dense SDPA) and plots time vs dense."""
import argparse
import csv


def load(path):
    rows, meta = [], {}
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                for kv in line[1:].split():
                    k, v = kv.split("=")
                    meta[k] = float(v)
    with open(path) as f:
        rows = list(csv.DictReader(l for l in f if not l.startswith("#")))
    return rows, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("sdpa")
    ap.add_argument("--plot")
    a = ap.parse_args()
    ours, meta = load(a.ours)
    sdpa, _ = load(a.sdpa)
    key = lambda r: (int(r["batch"]), int(r["tokens"]), int(r["hq"]), int(r["hkv"]), int(r["d"]))
    dense = {key(r): float(r["ms"]) for r in sdpa}
    print(f"copy bandwidth {meta.get('copy_gbps', 0):.0f} GB/s; JIT init cold "
          f"{meta.get('cold_init_ms', 0):.0f} ms, warm {meta.get('warm_init_ms', 0):.1f} ms")
    hdr = ("| B | T | Hq/Hkv | D | s | time ms | GB/s | % copy | floor ms | SDPA ms | vs SDPA "
           "| append ms | % of step | in-step append ms | % of step | prefill GB/s |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    plot = []
    for r in ours:
        k = key(r)
        ms, sd = float(r["ms"]), dense.get(k)
        ratio = ms / sd if sd else float("nan")
        pct = 100 * float(r["gbps"]) / meta.get("copy_gbps", 1)
        print(f"| {k[0]} | {k[1]} | {k[2]}/{k[3]} | {k[4]} | {float(r['sparsity']):.1f} | {ms:.4f} "
              f"| {float(r['gbps']):.0f} | {pct:.0f} | {float(r['floor_ms']):.4f} | "
              f"{sd if sd else float('nan'):.4f} | {ratio:.2f}x | {float(r['append_ms']):.4f} | "
              f"{100 * float(r['append_ms']) / ms:.1f} | {float(r['step_append_ms']):.4f} | "
              f"{100 * float(r['step_append_ms']) / ms:.1f} | {float(r['prefill_gbps']):.0f} |")
        plot.append((k, float(r["sparsity"]), ratio))
    if a.plot and plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = sorted({k for k, _, _ in plot}, key=lambda k: (k[4], k[0], k[1]))
        fig, ax = plt.subplots(figsize=(11, 4.5))
        width = 0.27
        for i, s in enumerate(sorted({s for _, s, _ in plot})):
            vals = [next((r for k2, s2, r in plot if k2 == k and s2 == s), float("nan")) for k in labels]
            name = "library dense path (s=0)" if s == 0 else f"mustafar s={s:.1f}"
            ax.bar([x + (i - 1) * width for x in range(len(labels))], vals, width, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"B{k[0]} T{k[1] // 1024}k\nD{k[4]}" for k in labels], fontsize=8)
        ax.set_ylabel("time / PyTorch SDPA time (lower is faster)")
        ax.set_title("Decode attention vs dense SDPA (fp16, Hq/Hkv = 32/8 unless D=256: 16/8)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
