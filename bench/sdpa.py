#!/usr/bin/env python3
"""Dense decode-attention baseline: PyTorch scaled_dot_product_attention with
q_len 1 and enable_gqa=True, fp16, on the shapes of bench.c.  CUDA events,
10 warm-up calls, median of 50, rotating over K/V sets that exceed 4x L2."""
import argparse
import torch
import torch.nn.functional as F

GRID = [(1, 4096, 32, 8, 128), (1, 32768, 32, 8, 128), (1, 131072, 32, 8, 128),
        (8, 4096, 32, 8, 128), (8, 32768, 32, 8, 128),
        (32, 4096, 32, 8, 128), (32, 32768, 32, 8, 128),
        (8, 32768, 32, 8, 64), (8, 32768, 16, 8, 256)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", default="bench/sdpa.csv")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    iters = 20 if args.quick else 50
    rows = []
    for b, t, hq, hkv, d in GRID:
        if args.quick and b * t > 8 * 32768:
            continue
        set_bytes = 2 * b * hkv * t * d * 2
        sets = min(64, int(4 * l2 / set_bytes) + 1)
        kv = [(torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16),
               torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)) for _ in range(sets)]
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        times = []
        for i in range(10 + iters):
            k, v = kv[i % sets]
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            e1.record()
            e1.synchronize()
            if i >= 10:
                times.append(e0.elapsed_time(e1))
        times.sort()
        ms = times[len(times) // 2]
        rows.append((b, t, hq, hkv, d, ms, set_bytes))
        print(f"sdpa B={b} T={t} Hq={hq} Hkv={hkv} D={d}: {ms:.4f} ms, "
              f"{set_bytes / ms / 1e6:.0f} GB/s", flush=True)
        del kv
        torch.cuda.empty_cache()
    with open(args.csv, "w") as f:
        f.write("batch,tokens,hq,hkv,d,ms,bytes\n")
        for r in rows:
            f.write(",".join(str(x) for x in r) + "\n")


if __name__ == "__main__":
    main()
