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

if [ "$HAVE_CUDA" = 1 ]; then CUDA_FLAGS="-isystem $CUDA_HOME/include"; else CUDA_FLAGS="-DMUSTAFAR_NO_CUDA"; fi
for cc in gcc clang; do
    for mode in "c -std=c99" "c++ -std=c++11"; do
        for cuda in "-DMUSTAFAR_NO_CUDA" "$CUDA_FLAGS"; do
            step "compile $cc -x $mode $cuda" $cc -x $mode -Wall -Wextra -Wpedantic -Werror $cuda \
                -c tests/test_main.c -o "$BUILD/compile_check.o"
        done
    done
done
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
for filter in test_cpu test_cache_attention; do
    "$BUILD/test_main_tsan" --backend cpu --quick --filter $filter > "$out" 2>&1
    grep -E '^(FAIL|seed)|ThreadSanitizer' "$out"; count "$out" "$filter under TSan"
done

if [ "$HAVE_CUDA" = 1 ]; then
    make --no-print-directory "$BUILD/test_nvrtc" >>"$log" 2>&1
    echo "NVRTC compile of every arch (a few minutes; one line per compile):"
    "$BUILD/test_nvrtc" 2>&1 | tee "$out" | sed 's/^/    /'; count "$out" "NVRTC compile of every arch"
else
    echo "NVRTC compile skipped: no CUDA toolkit"; skipped=$((skipped + 1))
fi

if [ "$skipped" -gt 0 ]; then echo "$passed passed, $failed failed, $skipped skipped"
else echo "$passed passed, $failed failed"; fi
[ "$failed" -eq 0 ]
