# mustafar.h - build, test and benchmark.
#   make run        build and run the quickstart example
#   make test       CPU tests, compile matrix, sanitizers, NVRTC compile of every arch,
#                   the CPU suite built for Windows (run under Wine) and ARM64 (under qemu)
#   make test-gpu   the test suite on the CUDA backend, plus compute-sanitizer
#   make bench      decode-attention benchmark on the GPU (with PyTorch SDPA)
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
# cross compilers for the Windows and ARM64 builds of the CPU test suite
MINGW_CC ?= x86_64-w64-mingw32-gcc
ARM64_CC ?= aarch64-linux-gnu-gcc

.PHONY: all run test test-gpu bench check clean
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
	$(CC) -std=c99 -O2 -g $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm

$(BUILD)/test_main_san: tests/test_main.c $(HEADERS) | $(BUILD)
	$(CC) -std=c99 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm

# Windows x86-64 (MinGW-w64), CPU backend; runs under Wine
$(BUILD)/test_main.exe: tests/test_main.c $(HEADERS) | $(BUILD)
	$(MINGW_CC) -std=c99 -O2 $(WARN) -DMUSTAFAR_NO_CUDA $< -o $@ -lm

# Linux ARM64, CPU backend, static so that qemu-user needs no sysroot
$(BUILD)/test_main_arm64: tests/test_main.c $(HEADERS) | $(BUILD)
	$(ARM64_CC) -std=c99 -O2 $(WARN) -DMUSTAFAR_NO_CUDA -static $< -o $@ -lm

$(BUILD)/test_nvrtc: tests/test_nvrtc.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm -lpthread

$(BUILD)/bench: bench/bench.c mustafar.h | $(BUILD)
	$(CC) -std=c99 -O2 $(WARN) $(CUDA_CFLAGS) $< -o $@ $(CUDA_LIBS) -lm

run: $(BUILD)/quickstart
	./$(BUILD)/quickstart

test: $(BUILD)/test_main $(BUILD)/test_main_san
	@HAVE_CUDA=$(HAVE_CUDA) CUDA_HOME=$(CUDA_HOME) BUILD=$(BUILD) MINGW_CC=$(MINGW_CC) ARM64_CC=$(ARM64_CC) \
	    sh tests/run_all.sh

test-gpu: $(BUILD)/test_main
	@BUILD=$(BUILD) sh tests/run_gpu.sh

bench: $(BUILD)/bench
	@BUILD=$(BUILD) sh bench/run.sh

clean:
	rm -rf $(BUILD)
