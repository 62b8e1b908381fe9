#!/bin/sh
# GPU checks: the suite on the CUDA backend (run-time loaded and linked), the
# C model on both backends, then the suite under compute-sanitizer memcheck and
# racecheck.  Ends with one line "N passed, M failed".
BUILD=${BUILD:-build}
case $BUILD in /*) ;; *) BUILD=./$BUILD ;; esac
passed=0; failed=0
out=$BUILD/gpu_out.txt
count() {
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
    if [ -z "$line" ]; then failed=$((failed + 1)); echo "FAIL $2: no summary line"; tail -n 20 "$1"; return; fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    passed=$((passed + p)); failed=$((failed + f))
    echo "$2: $line"
}
"$BUILD/test_main" --backend cuda > "$out" 2>&1; grep -E '^(FAIL|seed|GPU)' "$out"
# with no CUDA context every later step would fail the same way: stop here
if grep -q '^FAIL setup: .*no CUDA context' "$out"; then echo "0 passed, 1 failed"; exit 1; fi
count "$out" "suite on CUDA (runtime loaded at run time)"
"$BUILD/test_main_linked" --backend cuda > "$out" 2>&1; grep -E '^(FAIL|seed|GPU)' "$out"; count "$out" "suite on CUDA (linked build)"
"$BUILD/test_model" examples/model/tiny.safetensors examples/model/vectors.safetensors > "$out" 2>&1
grep -E '^FAIL|skipped' "$out"; count "$out" "the C model (CPU and CUDA backends)"
if grep -q 'GPU cases skipped' "$out"; then failed=$((failed + 1)); echo "FAIL the C model's GPU cases were skipped"; fi
# test_gpu_faults makes CUDA calls fail on purpose, which the sanitizer reports as API errors
for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 "$BUILD/test_main" --backend cuda --quick \
        --exclude gpu_faults > "$out" 2>&1
    rc=$?
    grep -E '^(FAIL|=========)' "$out" | head -n 30
    count "$out" "suite under compute-sanitizer $tool"
    if [ $rc -ne 0 ]; then failed=$((failed + 1)); echo "FAIL compute-sanitizer $tool exited $rc"; fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
