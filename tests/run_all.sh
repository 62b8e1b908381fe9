#!/bin/sh
# Runs every CPU-side check and ends with one line "N passed, M failed[, K skipped]".
# Each step is a test program ending with such a line, or a compile check that
# counts as one test.
BUILD=${BUILD:-build}
case $BUILD in /*) ;; *) BUILD=./$BUILD ;; esac
passed=0; failed=0; skipped=0
log=$BUILD/test.log
: > "$log"

count() {  # add up the closing line of a program's output
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
    if [ -z "$line" ]; then failed=$((failed + 1)); echo "FAIL $2: no summary line"; return; fi
    p=$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    s=$(echo "$line" | sed -nE 's/.*, ([0-9]+) skipped.*/\1/p')
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + ${s:-0}))
    echo "$2: $line"
}

step() {  # step NAME COMMAND...: a compile or script check counted as one test
    name=$1; shift
    if "$@" >>"$log" 2>&1; then passed=$((passed + 1)); echo "ok   $name"
    else failed=$((failed + 1)); echo "FAIL $name (see $log)"; fi
}

step "amalgamation in sync" python3 amalgamate.py --check

# CUDA builds: loaded at run time (no flags), or linked against the toolkit
CUDA_MODES="-DMUSTAFAR_NO_CUDA -DMUSTAFAR_CUDA_DYNAMIC"
if [ "$HAVE_CUDA" = 1 ]; then CUDA_MODES="$CUDA_MODES -DMUSTAFAR_CUDA_LINKED"; fi
for cc in gcc clang; do
    for mode in "c -std=c99" "c++ -std=c++11"; do
        for cuda in $CUDA_MODES; do
            extra=""; [ "$cuda" = -DMUSTAFAR_CUDA_LINKED ] && extra="-isystem $CUDA_HOME/include"
            step "compile $cc -x $mode $cuda" $cc -x $mode -Wall -Wextra -Wpedantic -Werror $cuda $extra \
                -c tests/test_main.c -o "$BUILD/compile_check.o"
        done
    done
done
if [ "$HAVE_CUDA" = 1 ]; then
    step "CUDA declarations match CUDA's headers" gcc -std=c99 -Wall -Wextra -Werror \
        -isystem "$CUDA_HOME/include" -c tests/test_cuda_abi.c -o "$BUILD/compile_check.o"
else
    echo "CUDA ABI check skipped: no CUDA toolkit"; skipped=$((skipped + 1))
fi
step "MUSTAFAR_MALLOC without MUSTAFAR_FREE is an #error" sh -c \
    'if gcc -std=c99 -DMUSTAFAR_NO_CUDA "-DMUSTAFAR_MALLOC(n)=malloc(n)" -c tests/test_main.c \
       -o /dev/null 2>"$0"; then exit 1; fi; grep -q "define both MUSTAFAR_MALLOC and MUSTAFAR_FREE" "$0"' \
    "$BUILD/malloc_check.txt"
step "compile example with MUSTAFAR_STATIC" gcc -std=c99 -Wall -Wextra -Wpedantic -Werror \
    -DMUSTAFAR_NO_CUDA -DMUSTAFAR_STATIC -c examples/quickstart.c -o "$BUILD/compile_check.o"

out=$BUILD/out.txt
"$BUILD/test_main" > "$out" 2>&1; cat "$out" | grep -E '^(FAIL|GPU|seed)' ; count "$out" "test suite"
"$BUILD/test_main_san" --backend cpu --quick > "$out" 2>&1
grep -E '^(FAIL|seed)|runtime error|AddressSanitizer' "$out"; count "$out" "test suite under ASan+UBSan"

"$BUILD/test_loader" "$BUILD" > "$out" 2>&1; grep FAIL "$out"; count "$out" "CUDA loader (stand-in libraries)"

if [ "$HAVE_CUDA" = 1 ]; then
    make --no-print-directory "$BUILD/test_nvrtc" >>"$log" 2>&1
    echo "NVRTC compile of every arch (a few minutes; one line per compile):"
    "$BUILD/test_nvrtc" 2>&1 | tee "$out" | sed 's/^/    /'; count "$out" "NVRTC compile of every arch"
else
    echo "NVRTC compile skipped: no CUDA toolkit"; skipped=$((skipped + 1))
fi

# the C transformer of examples/generate.c on the committed model: logits vs
# PyTorch's (s = 0) and vs a float64 attention over the pruned cache (s > 0)
if make --no-print-directory "$BUILD/test_model" >>"$log" 2>&1; then
    "$BUILD/test_model" examples/model/tiny.safetensors examples/model/vectors.safetensors > "$out" 2>&1
    grep -E '^(FAIL|GPU)' "$out"; count "$out" "model vs PyTorch and float64 attention"
else failed=$((failed + 1)); echo "FAIL build $BUILD/test_model (see $log)"; fi

if [ "$skipped" -gt 0 ]; then echo "$passed passed, $failed failed, $skipped skipped"
else echo "$passed passed, $failed failed"; fi
[ "$failed" -eq 0 ]
