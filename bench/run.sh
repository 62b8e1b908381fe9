#!/bin/sh
# make bench: the library's kernels, then the baselines (PyTorch SDPA flash and
# cuDNN, FlashInfer fp16 and fp8) on the same shapes, then the merged tables
# (and bench/results.png).
set -e
BUILD=${BUILD:-build}
OUTDIR=${OUT:-bench}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
# CUDA_CACHE_DISABLE: NVRTC (12.9+) keeps compiled programs in the driver's
# compute cache across processes, which would make "cold" init a cache hit.
CUDA_CACHE_DISABLE=1 "$BUILD/bench" ${BENCH_ARGS:-} --csv "$OUTDIR/results.csv"
python3 bench/baselines.py ${BENCH_ARGS:-} --csv "$OUTDIR/baselines.csv"
python3 bench/report.py "$OUTDIR/results.csv" "$OUTDIR/baselines.csv" --plot "$OUTDIR/results.png"
