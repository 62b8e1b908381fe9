# mustafar.h - build, test and benchmark.
#   make run        build and run the quickstart example
#   make test       CPU tests, compile matrix, sanitizers, NVRTC compile of every arch,
#                   the CPU suite built for Windows (run under Wine), ARM64 (under qemu)
#                   and 32-bit x86 (i386: every size in a 32-bit size_t),
#                   allocation-failure injection, threads under TSan, a short fuzz run
#   make fuzz       each libFuzzer target for FUZZ_TIME seconds (default 600)
#   make test-gpu   the test suite on the CUDA backend, plus compute-sanitizer
#   make bench      decode-attention benchmark on the GPU (with PyTorch SDPA)
#   make lib        build/libmustafar.so, the shared library the Python package loads
#   make bench-cpu  decode attention and prefill compression on the CPU backend
CUDA_HOME ?= /usr/local/cuda
BUILD ?= build
WARN := -Wall -Wextra -Wpedantic -Werror
# Programs load the CUDA runtime and NVRTC at run time (no CUDA flags); the
# toolkit's headers are needed only for the linked build and the ABI check.
HAVE_CUDA := $(shell test -f $(CUDA_HOME)/include/cuda_runtime.h && test -f $(CUDA_HOME)/include/nvrtc.h && echo 1)
CUDA_CFLAGS :=
CUDA_LIBS := -ldl
LINKED_CFLAGS := -DMUSTAFAR_CUDA_LINKED -isystem $(CUDA_HOME)/include
LINKED_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lnvrtc -lcudart
HEADERS := mustafar.h tests/*.h
# cross compilers for the Windows, ARM64 and 32-bit x86 builds of the CPU test suite
MINGW_CC ?= x86_64-w64-mingw32-gcc
ARM64_CC ?= aarch64-linux-gnu-gcc
I386_CC ?= i686-linux-gnu-gcc

.PHONY: all run test test-gpu bench bench-cpu check clean lib fuzz fuzz-build
all: $(BUILD)/quickstart $(BUILD)/test_main

$(BUILD):
	@mkdir -p $(BUILD)

check:
	python3 amalgamate.py --check


$(BUILD)/quickstart: examples/quickstart.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm

$(BUILD)/test_main: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O2 -g $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm -pthread

$(BUILD)/test_main_linked: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O2 -g $(WARN) $(LINKED_CFLAGS) $< -o $@ $(LINKED_LIBS) -lm

$(BUILD)/test_loader: tests/test_loader.c tests/fake_cuda.c mustafar.h | $(BUILD)
	@mkdir -p $(BUILD)/fake_cuda $(BUILD)/fake_cuda_missing $(BUILD)/fake_cuda_garbage $(BUILD)/fake_cuda_nodriver
	$(CC) -shared -fPIC tests/fake_cuda.c -o $(BUILD)/fake_cuda/libcudart.so.13
	cp $(BUILD)/fake_cuda/libcudart.so.13 $(BUILD)/fake_cuda/libnvrtc.so.13
	$(CC) -shared -fPIC -DFAKE_MISSING_LAUNCH tests/fake_cuda.c -o $(BUILD)/fake_cuda_missing/libcudart.so.13
	$(CC) -shared -fPIC -DFAKE_NO_DRIVER tests/fake_cuda.c -o $(BUILD)/fake_cuda_nodriver/libcudart.so.13
	cp $(BUILD)/fake_cuda_nodriver/libcudart.so.13 $(BUILD)/fake_cuda_nodriver/libnvrtc.so.13
	echo "not a library" > $(BUILD)/fake_cuda_garbage/libcudart.so.13
	$(CC) -std=c99 -O2 $(WARN) $< -o $@ -ldl -lm

# allocation-failure injection, ASan + UBSan + LeakSanitizer: CPU only, and
# with the CUDA code compiled in (loaded at run time; AUTO falls back)
SAN := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
$(BUILD)/test_faults: tests/test_faults.c mustafar.h | $(BUILD)
	$(CC) -std=c99 $(SAN) $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm
$(BUILD)/test_faults_cuda: tests/test_faults.c mustafar.h | $(BUILD)
	$(CC) -std=c99 $(SAN) $(WARN) $< -o $@ -ldl -lm

# contexts on separate threads at once, under ThreadSanitizer
$(BUILD)/test_threads: tests/test_threads.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O1 -g -fsanitize=thread $(WARN) $< -o $@ -ldl -lm -lpthread

# libFuzzer targets (clang); tests/run_all.sh runs each briefly, make fuzz longer
FUZZ_CC ?= clang
FUZZ_TARGETS := $(BUILD)/fuzz/fuzz_load $(BUILD)/fuzz/fuzz_records $(BUILD)/fuzz/fuzz_ops
FUZZ_TIME ?= 600
$(BUILD)/fuzz/%: tests/fuzz/%.c tests/fuzz/fuzz_common.h mustafar.h
	@mkdir -p $(BUILD)/fuzz
	$(FUZZ_CC) -std=c99 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
	    $(FUZZ_EXTRA) $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm
# the operations target is driven by opcode bytes, not by compared values:
# without comparison tracing it runs 3x faster
$(BUILD)/fuzz/fuzz_ops: FUZZ_EXTRA := -fno-sanitize-coverage=trace-cmp
fuzz-build: $(FUZZ_TARGETS)
# a long run of every target (FUZZ_TIME seconds each) on a working copy of the corpus
fuzz: $(FUZZ_TARGETS)
	@for t in load records ops; do mkdir -p $(BUILD)/fuzz/corpus_$$t; \
	    cp tests/fuzz/corpus/$$t/* $(BUILD)/fuzz/corpus_$$t/; \
	    $(BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_TIME) -print_final_stats=1 \
	        -artifact_prefix=$(BUILD)/fuzz/ $(BUILD)/fuzz/corpus_$$t || exit 1; done

$(BUILD)/test_main_san: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm -pthread

# The CPU backend's threads (built-in pool and user callback) under ThreadSanitizer.
$(BUILD)/test_main_tsan: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O1 -g -fsanitize=thread $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm -pthread

# Windows x86-64 (MinGW-w64), CPU backend; runs under Wine
$(BUILD)/test_main.exe: tests/test_main.c $(HEADERS) | $(BUILD)
	$(MINGW_CC) -std=c99 -O2 $(WARN) $< -o $@ -lm

# Linux ARM64, CPU backend, static so that qemu-user needs no sysroot
$(BUILD)/test_main_arm64: tests/test_main.c $(HEADERS) | $(BUILD)
	$(ARM64_CC) -std=c99 -O2 $(WARN) -DMUSTAFAR_NO_CUDA -static $< -o $@ -lm

# Linux i386 (32-bit size_t), CPU backend, static: an x86-64 kernel runs it
$(BUILD)/test_main_i386: tests/test_main.c $(HEADERS) | $(BUILD)
	$(I386_CC) -std=c99 -O2 $(WARN) -DMUSTAFAR_NO_CUDA -static $< -o $@ -lm -pthread

$(BUILD)/test_nvrtc: tests/test_nvrtc.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm -lpthread

$(BUILD)/libmustafar.so: python/libmustafar.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 -fPIC -shared $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm

lib: $(BUILD)/libmustafar.so

$(BUILD)/bench: bench/bench.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(LINKED_CFLAGS) $< -o $@ $(LINKED_LIBS) -lm

# A generic x86-64 build (no -march): the AVX2 path is chosen at run time.
$(BUILD)/bench_cpu: bench/bench_cpu.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) -DMUSTAFAR_NO_CUDA -pthread $< -o $@ -lm

run: $(BUILD)/quickstart
	./$(BUILD)/quickstart

test: $(BUILD)/test_main $(BUILD)/test_main_san $(BUILD)/test_main_tsan $(BUILD)/test_loader \
      $(BUILD)/libmustafar.so $(BUILD)/test_faults $(BUILD)/test_faults_cuda $(BUILD)/test_threads
	@HAVE_CUDA=$(HAVE_CUDA) CUDA_HOME=$(CUDA_HOME) BUILD=$(BUILD) MINGW_CC=$(MINGW_CC) ARM64_CC=$(ARM64_CC) \
	    I386_CC=$(I386_CC) \
	    FUZZ_CC=$(FUZZ_CC) \
	    sh tests/run_all.sh

test-gpu: $(BUILD)/test_main $(BUILD)/test_main_linked $(BUILD)/test_model
	@BUILD=$(BUILD) sh tests/run_gpu.sh

bench: $(BUILD)/bench
	@BUILD=$(BUILD) sh bench/run.sh

bench-cpu: $(BUILD)/bench_cpu
	./$(BUILD)/bench_cpu

clean:
	rm -rf $(BUILD)

# The small trained model of examples/model: make demo generates from it on
# the CPU; make fidelity measures what pruning costs it (FULL=1: the full
# grid, tens of CPU minutes; REFERENCE=1: also the PyTorch keep-rule
# reference); tests/run_all.sh builds and runs $(BUILD)/test_model.
.PHONY: demo fidelity
DEMO_PROMPT := def parse_args(argv):
$(BUILD)/generate: examples/generate.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $< -o $@ -lm -ldl -lpthread

$(BUILD)/test_model: tests/test_model.c examples/generate.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 -g $(WARN) $< -o $@ -lm -ldl -lpthread

demo: $(BUILD)/generate
	./$(BUILD)/generate --model examples/model/tiny.safetensors --backend cpu \
	    --prompt '$(DEMO_PROMPT)' --tokens 240 --temp 0.6 --seed 7 --ks 0.7 --vs 0.7 --window 32

fidelity: $(BUILD)/generate
	python3 tools/fidelity.py --generate $(BUILD)/generate --dir $(BUILD)/fidelity \
	    --md $(BUILD)/fidelity/table.md --png $(BUILD)/fidelity/fidelity.png \
	    $(if $(FULL),--full) $(if $(REFERENCE),--reference)
