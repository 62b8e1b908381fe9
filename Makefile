# mustafar.h - build, test and benchmark.
#   make run        build and run the quickstart example
#   make test       CPU tests, compile matrix, sanitizers, NVRTC compile of every arch
#   make test-gpu   the test suite on the CUDA backend, plus compute-sanitizer
#   make bench      decode-attention benchmark on the GPU (with PyTorch SDPA)
#   make bench-cpu  decode attention and prefill compression on the CPU backend
CUDA_HOME ?= /usr/local/cuda
BUILD ?= build
WARN := -Wall -Wextra -Wpedantic -Werror
HAVE_CUDA := $(shell test -f $(CUDA_HOME)/include/cuda_runtime.h && test -f $(CUDA_HOME)/include/nvrtc.h && echo 1)
ifeq ($(HAVE_CUDA),1)
CUDA_CFLAGS := -isystem $(CUDA_HOME)/include
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lnvrtc -lcudart
else
CUDA_CFLAGS := -DMUSTAFAR_NO_CUDA
CUDA_LIBS :=
endif
HEADERS := mustafar.h tests/*.h

.PHONY: all run test test-gpu bench bench-cpu check clean
all: $(BUILD)/quickstart $(BUILD)/test_main

$(BUILD):
	@mkdir -p $(BUILD)

check:
	python3 amalgamate.py --check

ifneq ($(HAVE_CUDA),1)
$(info CUDA not found under CUDA_HOME=$(CUDA_HOME): building the CPU backend only)
endif

$(BUILD)/quickstart: examples/quickstart.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm

$(BUILD)/test_main: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O2 -g $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm -pthread

$(BUILD)/test_main_san: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm -pthread

# The CPU backend's threads (built-in pool and user callback) under ThreadSanitizer.
$(BUILD)/test_main_tsan: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O1 -g -fsanitize=thread $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm -pthread

$(BUILD)/test_nvrtc: tests/test_nvrtc.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm -lpthread

$(BUILD)/bench: bench/bench.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm

# A generic x86-64 build (no -march): the AVX2 path is chosen at run time.
$(BUILD)/bench_cpu: bench/bench_cpu.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) -DMUSTAFAR_NO_CUDA -pthread $< -o $@ -lm

run: $(BUILD)/quickstart
	./$(BUILD)/quickstart

test: $(BUILD)/test_main $(BUILD)/test_main_san $(BUILD)/test_main_tsan
	@HAVE_CUDA=$(HAVE_CUDA) CUDA_HOME=$(CUDA_HOME) BUILD=$(BUILD) sh tests/run_all.sh

test-gpu: $(BUILD)/test_main
	@BUILD=$(BUILD) sh tests/run_gpu.sh

bench: $(BUILD)/bench
	@BUILD=$(BUILD) sh bench/run.sh

bench-cpu: $(BUILD)/bench_cpu
	./$(BUILD)/bench_cpu

clean:
	rm -rf $(BUILD)
