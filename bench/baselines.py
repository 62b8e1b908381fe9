#!/usr/bin/env python3
"""Decode-attention baselines on the shapes of bench.c, q_len 1, fp16 queries:

  sdpa_flash, sdpa_cudnn   torch.nn.functional.scaled_dot_product_attention
                           (enable_gqa=True) forced to its flash and its cuDNN
                           backend, dense fp16 K/V [B][Hkv][T][D];
  flashinfer_fp16/_fp8     FlashInfer's BatchDecodeWithPagedKVCacheWrapper,
                           NHD pages of 16 positions, fp16 and fp8 (e4m3) K/V,
                           the faster of its tensor-core and CUDA-core paths
                           (only when the flashinfer package imports).

CUDA events around one call, 10 warm-up calls, median of 50, rotating over
K/V sets that together exceed 4x the L2 cache.  A backend that refuses a
shape gets an empty cell."""
import argparse
import math
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

GRID = [(1, 4096, 32, 8, 128), (1, 32768, 32, 8, 128), (1, 131072, 32, 8, 128),
        (8, 4096, 32, 8, 128), (8, 32768, 32, 8, 128),
        (32, 4096, 32, 8, 128), (32, 32768, 32, 8, 128),
        (8, 32768, 32, 8, 64), (8, 32768, 16, 8, 256)]
COLUMNS = ["sdpa_flash", "sdpa_cudnn", "flashinfer_fp16", "flashinfer_fp8"]
PAGE = 16


def median_ms(fn, sets, iters):
    times = []
    for i in range(10 + iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(i % sets)
        e1.record()
        e1.synchronize()
        if i >= 10:
            times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2]


def sdpa(backend, b, t, hq, hkv, d, sets, iters, dev):
    kv = [(torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16),
           torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)) for _ in range(sets)]
    q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
    with sdpa_kernel(backend):
        run = lambda i: F.scaled_dot_product_attention(q, kv[i][0], kv[i][1], enable_gqa=True)
        run(0)
        return median_ms(run, sets, iters)


def flashinfer_decode(fi, kv_dtype, b, t, hq, hkv, d, sets, iters, dev):
    pages_per_seq = (t + PAGE - 1) // PAGE
    npages = b * pages_per_seq
    indptr = torch.arange(0, npages + 1, pages_per_seq, device=dev, dtype=torch.int32)
    indices = torch.arange(npages, device=dev, dtype=torch.int32)
    last = torch.full((b,), t - (pages_per_seq - 1) * PAGE, device=dev, dtype=torch.int32)
    caches = []
    for _ in range(sets):
        c = torch.randn(npages, 2, PAGE, hkv, d, device=dev, dtype=torch.float16)
        caches.append(c.to(kv_dtype) if kv_dtype != torch.float16 else c)
    q = torch.randn(b, hq, d, device=dev, dtype=torch.float16)
    best = math.inf
    for tensor_cores in (True, False):
        try:
            ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
            w.plan(indptr, indices, last, hq, hkv, d, PAGE, q_data_type=torch.float16,
                   kv_data_type=kv_dtype)
            run = lambda i: w.run(q, caches[i])
            run(0)
            best = min(best, median_ms(run, sets, iters))
        except Exception as e:  # a path that does not support this shape or dtype
            print(f"  flashinfer {kv_dtype} tensor_cores={tensor_cores}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
    return best if best < math.inf else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--row", help="B,T,D: one shape of the grid")
    ap.add_argument("--csv", default="bench/baselines.csv")
    args, _ = ap.parse_known_args()   # bench.c's options (--sparsity, --no-init) pass through
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    iters = 20 if args.quick else 50
    try:
        import flashinfer as fi
        print(f"flashinfer {fi.__version__}", flush=True)
    except Exception as e:
        fi = None
        print(f"flashinfer not available ({type(e).__name__}): its columns stay empty", flush=True)
    grid = GRID
    if args.row:
        b, t, d = (int(x) for x in args.row.split(","))
        grid = [g for g in GRID if (g[0], g[1], g[4]) == (b, t, d)]
    rows = []
    for b, t, hq, hkv, d in grid:
        if args.quick and b * t > 8 * 32768:
            continue
        set_bytes = 2 * b * hkv * t * d * 2
        sets = min(64, int(4 * l2 / set_bytes) + 1)
        ms = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                              ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                ms[name] = sdpa(backend, b, t, hq, hkv, d, sets, iters, dev)
            except RuntimeError as e:
                print(f"  {name}: {str(e).splitlines()[0]}", flush=True)
            torch.cuda.empty_cache()
        if fi is not None:
            ms["flashinfer_fp16"] = flashinfer_decode(fi, torch.float16, b, t, hq, hkv, d, sets, iters, dev)
            torch.cuda.empty_cache()
            ms["flashinfer_fp8"] = flashinfer_decode(fi, torch.float8_e4m3fn, b, t, hq, hkv, d,
                                                     min(64, 2 * sets), iters, dev)
            torch.cuda.empty_cache()
        rows.append((b, t, hq, hkv, d, set_bytes, [ms.get(c) for c in COLUMNS]))
        print(f"B={b} T={t} Hq={hq} Hkv={hkv} D={d}: " +
              ", ".join(f"{c} {ms[c]:.4f}" for c in COLUMNS if ms.get(c)), flush=True)
    with open(args.csv, "w") as f:
        f.write("batch,tokens,hq,hkv,d,dense_bytes," + ",".join(c + "_ms" for c in COLUMNS) + "\n")
        for b, t, hq, hkv, d, nbytes, vals in rows:
            f.write(f"{b},{t},{hq},{hkv},{d},{nbytes}," +
                    ",".join("" if v is None else f"{v:.5f}" for v in vals) + "\n")


if __name__ == "__main__":
    main()
