#!/usr/bin/env python3
"""Merges bench.c's CSV (the library) and baselines.py's CSV into two tables:
the library's times, bandwidth, appends and prefill; then each row against
the baselines (the faster SDPA backend, FlashInfer fp16 and fp8).  Plots
time / faster-SDPA time."""
import argparse
import csv
import math


def load(path):
    meta = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                for kv in line[1:].split():
                    k, v = kv.split("=")
                    meta[k] = float(v)
    with open(path) as f:
        rows = list(csv.DictReader(l for l in f if not l.startswith("#")))
    return rows, meta


def num(x):
    return float(x) if x not in (None, "") else math.nan


def fmt(x, spec):
    return "" if math.isnan(x) else format(x, spec)


def faster_sdpa(b):
    return min((x for x in (num(b.get("sdpa_flash_ms")), num(b.get("sdpa_cudnn_ms"))) if not math.isnan(x)),
               default=math.nan)


def table_header(hdr):
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))


def row_start(k, r, ms):
    """The columns every table starts with: shape, sparsity, our time."""
    return f"| {k[0]} | {k[1]} | {k[2]}/{k[3]} | {k[4]} | {num(r['sparsity']):.1f} | {ms:.4f} "


def merged(ours, bl, key, copy):
    hdr = ("| B | T | Hq/Hkv | D | s | time ms | % copy | faster SDPA ms | vs SDPA | FlashInfer fp16 ms "
           "| FlashInfer fp8 ms | vs fp8 | append ms | prefill GB/s |")
    table_header(hdr)
    for r in ours:
        k = key(r)
        ms, b = num(r["ms"]), bl.get(k, {})
        best, fp8 = faster_sdpa(b), num(b.get("flashinfer_fp8_ms"))
        print(row_start(k, r, ms) +
              f"| {100 * num(r['gbps']) / copy:.0f} | {fmt(best, '.4f')} | {fmt(ms / best, '.2f')}x "
              f"| {fmt(num(b.get('flashinfer_fp16_ms')), '.4f')} | {fmt(fp8, '.4f')} | {fmt(ms / fp8, '.2f')}x "
              f"| {num(r['append_ms']):.4f} | {num(r['prefill_gbps']):.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("baselines")
    ap.add_argument("--plot")
    ap.add_argument("--merged", action="store_true",
                    help="one compact table (as in bench/RESULTS.md) instead of the two")
    a = ap.parse_args()
    ours, meta = load(a.ours)
    base, _ = load(a.baselines)
    key = lambda r: (int(r["batch"]), int(r["tokens"]), int(r["hq"]), int(r["hkv"]), int(r["d"]))
    bl = {key(r): r for r in base}
    copy = meta.get("copy_gbps", math.nan)
    print(f"copy bandwidth {copy:.0f} GB/s; JIT init cold {meta.get('cold_init_ms', 0):.0f} ms, "
          f"warm {meta.get('warm_init_ms', 0):.1f} ms\n")
    if a.merged:
        merged(ours, bl, key, copy)
        return
    hdr = ("| B | T | Hq/Hkv | D | s | time ms | GB/s | % copy | floor ms | append ms | in-step "
           "append ms | prefill GB/s |")
    table_header(hdr)
    for r in ours:
        k = key(r)
        ms = num(r["ms"])
        print(row_start(k, r, ms) +
              f"| {num(r['gbps']):.0f} | {100 * num(r['gbps']) / copy:.0f} | {num(r['floor_ms']):.4f} "
              f"| {num(r['append_ms']):.4f} | {num(r['step_append_ms']):.4f} "
              f"| {num(r['prefill_gbps']):.0f} |")
    print()
    hdr = ("| B | T | Hq/Hkv | D | s | time ms | SDPA flash | SDPA cuDNN | vs faster SDPA "
           "| FlashInfer fp16 | FlashInfer fp8 | vs FlashInfer fp8 |")
    table_header(hdr)
    plot = []
    for r in ours:
        k = key(r)
        ms, b = num(r["ms"]), bl.get(k, {})
        flash, cudnn = num(b.get("sdpa_flash_ms")), num(b.get("sdpa_cudnn_ms"))
        fp16, fp8 = num(b.get("flashinfer_fp16_ms")), num(b.get("flashinfer_fp8_ms"))
        best = faster_sdpa(b)
        print(row_start(k, r, ms) +
              f"| {fmt(flash, '.4f')} | {fmt(cudnn, '.4f')} | {fmt(ms / best, '.2f')}x "
              f"| {fmt(fp16, '.4f')} | {fmt(fp8, '.4f')} | {fmt(ms / fp8, '.2f')}x |")
        plot.append((k, num(r["sparsity"]), ms / best))
    if a.plot and plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = sorted({k for k, _, _ in plot}, key=lambda k: (k[4], k[0], k[1]))
        fig, ax = plt.subplots(figsize=(11, 4.5))
        width = 0.27
        for i, s in enumerate(sorted({s for _, s, _ in plot})):
            vals = [next((r for k2, s2, r in plot if k2 == k and s2 == s), math.nan) for k in labels]
            name = "library dense path (s=0)" if s == 0 else f"mustafar s={s:.1f}"
            ax.bar([x + (i - 1) * width for x in range(len(labels))], vals, width, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"B{k[0]} T{k[1] // 1024}k\nD{k[4]}" for k in labels], fontsize=8)
        ax.set_ylabel("time / faster SDPA time (lower is faster)")
        ax.set_title("Decode attention vs dense SDPA, the faster of flash and cuDNN "
                     "(fp16, Hq/Hkv = 32/8 unless D=256: 16/8)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
