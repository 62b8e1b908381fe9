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
# the header alone with optimisation: some warnings (g++'s maybe-uninitialized)
# appear only when the SIMD paths are inlined
printf '#define MUSTAFAR_IMPLEMENTATION\n#include "mustafar.h"\n' > "$BUILD/header_only.c"
for cc in gcc clang; do
    for mode in "c -std=c99" "c++ -std=c++11"; do
        step "compile $cc -x $mode -O2, the header alone" $cc -x $mode -O2 -Wall -Wextra -Wpedantic -Werror \
            -I. -c "$BUILD/header_only.c" -o "$BUILD/compile_check.o"
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
step "the header's EXAMPLE compiles as C99 and C++11" sh tests/doc_example.sh "$BUILD"
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

"$BUILD/test_loader" "$BUILD" > "$out" 2>&1; grep FAIL "$out"; count "$out" "CUDA loader (stand-in libraries)"

# sanitized() NAME COMMAND...: a test program under a sanitizer; counted by its
# summary line, and failed too if it exits nonzero (LeakSanitizer reports at exit,
# after the summary)
sanitized() {
    name=$1; shift
    "$@" > "$out" 2>&1; rc=$?
    grep -E '^FAIL|runtime error|Sanitizer' "$out"
    count "$out" "$name"
    if [ $rc -ne 0 ] && ! grep -qE '^FAIL' "$out"; then
        failed=$((failed + 1)); echo "FAIL $name: exit status $rc"; cat "$out" >> "$log"
    fi
}

# Allocation failures injected into every allocation of each scenario
# (ASan + UBSan + LeakSanitizer): CPU only, and with CUDA compiled in
# (loaded at run time; without a usable GPU AUTO falls back to the CPU).
sanitized "allocation-failure injection (ASan, LSan)" "$BUILD/test_faults"
sanitized "allocation-failure injection, CUDA compiled in" "$BUILD/test_faults_cuda"
# Separate contexts on separate threads at once, under ThreadSanitizer
TSAN_OPTIONS="halt_on_error=1 exitcode=66"; export TSAN_OPTIONS
sanitized "contexts on 4 threads under TSan" "$BUILD/test_threads" 4 2

# libFuzzer targets, a short run each on a copy of the committed corpus.
# Skipped, saying so, where clang's fuzzer runtime is missing.
FUZZ_CC=${FUZZ_CC:-clang}
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
    > "$BUILD/fuzz_probe.c"
if ! command -v "$FUZZ_CC" >/dev/null 2>&1 || \
   ! "$FUZZ_CC" -fsanitize=fuzzer,address,undefined "$BUILD/fuzz_probe.c" -o "$BUILD/fuzz_probe" >/dev/null 2>&1; then
    echo "fuzz run skipped: $FUZZ_CC cannot link -fsanitize=fuzzer (Debian: apt-get install clang libclang-rt-dev)"
    skipped=$((skipped + 1))
elif ! make --no-print-directory fuzz-build >>"$log" 2>&1; then
    failed=$((failed + 1)); echo "FAIL fuzz targets: build (see $log)"
else
    for t in load records ops; do
        rm -rf "$BUILD/fuzz/smoke_$t"; mkdir -p "$BUILD/fuzz/smoke_$t"
        cp tests/fuzz/corpus/$t/* "$BUILD/fuzz/smoke_$t/"
        if "$BUILD/fuzz/fuzz_$t" -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 \
               -artifact_prefix="$BUILD/fuzz/" "$BUILD/fuzz/smoke_$t" > "$out" 2>&1; then
            passed=$((passed + 1))
            echo "ok   fuzz $t: $(sed -nE 's/^stat::number_of_executed_units: *//p' "$out") runs in ${FUZZ_SECONDS} s"
        else
            failed=$((failed + 1)); cat "$out" >> "$log"
            echo "FAIL fuzz $t: $(grep -m1 -E 'ERROR|tests/fuzz/.*:[0-9]+:' "$out") (input in $BUILD/fuzz/, log in $log)"
        fi
    done
fi

# The CPU suite built for other platforms and run under an emulator (--quick:
# emulation is slower). A missing compiler or emulator counts as skipped,
# saying so; a build that fails counts as a failure.
emulator_runs() {  # emulator_runs COMPILER TARGET RUNNER...: does RUNNER run a program that only prints?
    probe_cc=$1 probe=$BUILD/emulator_probe
    case $2 in *.exe) probe=$probe.exe ;; esac
    shift 2
    printf '#include <stdio.h>\nint main(void) { puts("ok"); return 0; }\n' > "$BUILD/emulator_probe.c"
    "$probe_cc" -static "$BUILD/emulator_probe.c" -o "$probe" >>"$log" 2>&1 &&
        [ "$(timeout 300 "$@" "$probe" 2>>"$log" | tr -d '\r')" = ok ]
}

cross() {  # cross NAME COMPILER TARGET RUNNER...: build TARGET with make, run it
    name=$1 ccx=$2 target=$3; shift 3
    if ! command -v "$ccx" >/dev/null 2>&1; then
        echo "$name skipped: no $ccx (see README, Tests)"; skipped=$((skipped + 1)); return
    fi
    if ! make --no-print-directory "$target" >>"$log" 2>&1; then
        failed=$((failed + 1)); echo "FAIL $name: build of $target (see $log)"; return
    fi
    if [ -z "$1" ]; then
        echo "$name: built; run skipped: no emulator (see README, Tests)"; skipped=$((skipped + 1)); return
    fi
    t0=$(date +%s) emu_err=$BUILD/emulator_stderr.txt
    timeout 900 "$@" "$target" --backend cpu --quick > "$out" 2>"$emu_err"; rc=$?
    # The suite prints (and flushes) its seed line first: output without it
    # means the emulator never started the program (e.g. Wine failing to set
    # up a new prefix), which is retried once, saying so.
    if ! grep -q '^seed' "$out"; then
        echo "note: $name: the emulator did not start the program (exit $rc: $(head -n 1 "$emu_err")); retrying once"
        { echo "== $name: emulator stderr of the failed start"; cat "$emu_err"; } >> "$log"
        timeout 900 "$@" "$target" --backend cpu --quick > "$out" 2>"$emu_err"
        if ! grep -q '^seed' "$out" && ! emulator_runs "$ccx" "$target" "$@"; then
            { echo "== $name: emulator stderr"; cat "$emu_err"; } >> "$log"
            echo "$name skipped: the emulator runs no program here, not even one that only prints"
            echo "    (its stderr: $(head -n 1 "$emu_err"); see $log)"; skipped=$((skipped + 1)); return
        fi
    fi
    # the emulator's own messages (wine: ..., fixme: ...) are not the suite's
    grep -vE '^(wine|fixme|err|warn|qemu)[:-]' "$emu_err" >> "$out"
    if ! grep -qE '^[0-9]+ passed, [0-9]+ failed' "$out"; then
        { echo "== $name: emulator stderr"; cat "$emu_err"; } >> "$log"
        echo "$name: no summary line; the emulator's stderr ends:"; tail -n 5 "$emu_err" | sed 's/^/    /'
    fi
    grep -E '^(FAIL|seed)' "$out"; count "$out" "$name ($(( $(date +%s) - t0 )) s)"
}

MINGW_CC=${MINGW_CC:-x86_64-w64-mingw32-gcc}
ARM64_CC=${ARM64_CC:-aarch64-linux-gnu-gcc}
if command -v "${MINGW_CC%gcc}g++" >/dev/null 2>&1; then
    step "compile ${MINGW_CC%gcc}g++ -x c++ -std=c++11 -DMUSTAFAR_NO_CUDA" "${MINGW_CC%gcc}g++" -x c++ -std=c++11 \
        -Wall -Wextra -Wpedantic -Werror -DMUSTAFAR_NO_CUDA -c tests/test_main.c -o "$BUILD/compile_check.o"
    step "compile ${MINGW_CC%gcc}g++ -x c++ -std=c++11 (CUDA loaded at run time)" "${MINGW_CC%gcc}g++" -x c++ \
        -std=c++11 -Wall -Wextra -Wpedantic -Werror -c tests/test_main.c -o "$BUILD/compile_check.o"
    step "compile ${MINGW_CC%gcc}g++ example" "${MINGW_CC%gcc}g++" -x c++ -std=c++11 \
        -Wall -Wextra -Wpedantic -Werror -DMUSTAFAR_NO_CUDA -c examples/quickstart.c -o "$BUILD/compile_check.o"
fi
if command -v "$MINGW_CC" >/dev/null 2>&1; then
    step "compile $MINGW_CC example" "$MINGW_CC" -std=c99 -Wall -Wextra -Wpedantic -Werror -DMUSTAFAR_NO_CUDA \
        -c examples/quickstart.c -o "$BUILD/compile_check.o"
fi
wine=
for w in wine wine64 /usr/lib/wine/wine64; do command -v "$w" >/dev/null 2>&1 && { wine=$w; break; }; done
# A prefix of its own under the build folder, created up front (~15 s) and
# waited for, so that the suite's run does not race Wine's first-run setup.
WINEPREFIX=$(cd "$BUILD" && pwd)/wineprefix; WINEDEBUG=-all; export WINEPREFIX WINEDEBUG
if [ -n "$wine" ] && command -v "$MINGW_CC" >/dev/null 2>&1; then
    timeout 300 "$wine" wineboot --init >>"$log" 2>&1
    command -v wineserver >/dev/null 2>&1 && timeout 120 wineserver -w >>"$log" 2>&1
fi
cross "test suite, Windows (MinGW-w64, CUDA loader compiled in) build under Wine" "$MINGW_CC" "$BUILD/test_main.exe" $wine
if command -v "$ARM64_CC" >/dev/null 2>&1; then
    step "compile $ARM64_CC (CUDA loaded at run time)" "$ARM64_CC" -std=c99 -Wall -Wextra -Wpedantic -Werror \
        -c tests/test_main.c -o "$BUILD/compile_check.o"
fi
qemu=
for q in qemu-aarch64 qemu-aarch64-static; do command -v "$q" >/dev/null 2>&1 && { qemu=$q; break; }; done
cross "test suite, ARM64 build under qemu-user" "$ARM64_CC" "$BUILD/test_main_arm64" $qemu
I386_CC=${I386_CC:-i686-linux-gnu-gcc}
cross "test suite, 32-bit x86 (i386) build" "$I386_CC" "$BUILD/test_main_i386" env

if [ "$HAVE_CUDA" = 1 ]; then
    make --no-print-directory "$BUILD/test_nvrtc" >>"$log" 2>&1
    echo "NVRTC compile of every arch (a few minutes; one line per compile):"
    "$BUILD/test_nvrtc" 2>&1 | tee "$out" | while IFS= read -r line; do echo "    $line"; done
    count "$out" "NVRTC compile of every arch"
else
    echo "NVRTC compile skipped: no CUDA toolkit"; skipped=$((skipped + 1))
fi

if python3 -c 'import numpy' 2>/dev/null; then
    echo "Python package and Hugging Face tests (a minute on the CPU):"
    MUSTAFAR_LIBRARY=$BUILD/libmustafar.so PYTHONPATH=python python3 tests/python/run.py > "$out" 2>&1
    grep -E '^(FAIL|ERROR|skipped)' "$out" | sed 's/^/    /'; count "$out" "Python tests"
else
    echo "Python tests skipped: numpy not installed (.ci/run installs it)"; skipped=$((skipped + 1))
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
