# bitnet-worker build. `make -j2` builds bin/; `make demo` and `make test` first
# install any missing Debian packages (tools/install-deps.sh), then build.
#   make test T=name     run one test        make test SAN=1   ASan + UBSan build
#   make bench           benchmarks (not part of the tests)
#   make cross           the aarch64 test binary (NEON), run under qemu by make test

CC      := gcc
SAN     ?=
O       := $(if $(SAN),build-san,build)
BIN     := $(if $(SAN),bin-san,bin)
SANFLAGS := -fsanitize=address -fsanitize=undefined
OPT     := $(if $(SAN),-O1 $(SANFLAGS) -fno-omit-frame-pointer -fno-sanitize-recover=undefined,-O2)
CFLAGS  := -std=c11 -D_GNU_SOURCE -g -Wall -Wextra -Wshadow -Wno-unused-parameter -pthread -I. $(OPT)
LDFLAGS := -pthread $(if $(SAN),$(SANFLAGS))
LDLIBS  := -lm
# Deferred (=), so the sub-make started after install-deps.sh sees the packages.
MPI_CFLAGS = $(shell pkg-config --cflags ompi-c)
MPI_LIBS   = $(shell pkg-config --libs ompi-c)

# One file per ISA, each compiled with only its own -m flags; dispatch.c picks one
# at run time from CPUID, so the default build runs on every x86-64 (or aarch64) node.
ARCH    := $(shell $(CC) -dumpmachine)
ISA_SRC := $(if $(findstring x86_64,$(ARCH)),$(wildcard kernels/x86/*.c))$(if $(findstring aarch64,$(ARCH)),$(wildcard kernels/arm/*.c))
ISA_FLAGS_avx2   := -mavx2 -mfma -mf16c
ISA_FLAGS_avx512 := -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx2 -mfma -mf16c
ISA_FLAGS_neon   :=

LIB_SRC := proto/status.c $(ISA_SRC) \
           $(wildcard kernels/*.c kernels/ref/*.c coordinator/*.c) \
           $(filter-out worker/main.c worker/comm.c worker/engine.c worker/sanitizer.c,$(wildcard worker/*.c)) \
           $(filter-out tools/mkmodel.c,$(wildcard tools/*.c))
LIB_OBJ := $(LIB_SRC:%.c=$(O)/%.o)
TEST_OBJ := $(patsubst %.c,$(O)/%.o,$(wildcard tests/*.c))

.PHONY: all clean demo test deps bench cross
all: $(BIN)/bitnet-worker $(BIN)/bitnet-mkmodel $(BIN)/bitnet-tests

$(O)/libbn.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(O)/worker/comm.o: worker/comm.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(MPI_CFLAGS) -MMD -MP -c $< -o $@

$(O)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(O)/kernels/x86/%.o: kernels/x86/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(ISA_FLAGS_$*) -MMD -MP -c $< -o $@

$(BIN)/bitnet-worker: $(O)/worker/main.o $(O)/worker/comm.o $(O)/worker/engine.o $(O)/worker/sanitizer.o $(O)/libbn.a
	@mkdir -p $(BIN)
	$(CC) $(LDFLAGS) $^ -o $@ $(MPI_LIBS) $(LDLIBS)

$(BIN)/bitnet-mkmodel: $(O)/tools/mkmodel.o $(O)/libbn.a
	@mkdir -p $(BIN)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BIN)/bitnet-tests: $(TEST_OBJ) $(O)/libbn.a
	@mkdir -p $(BIN)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

deps:
	@sh tools/install-deps.sh

# The demo: a small random-weight model (gibberish text) generated and run.
DEMO_MODEL := models/demo-tiny.gguf
demo: deps
	@$(MAKE) --no-print-directory -j2 all
	@mkdir -p models
	$(BIN)/bitnet-mkmodel --preset tiny --wtype i2_s --seed 1 -o $(DEMO_MODEL)
	$(BIN)/bitnet-worker --model $(DEMO_MODEL) --prompt "Once upon a time" -n 48 --seed 7 --temp 0.8 --stats
	@echo "--- the same over 4 MPI ranks (2 tensor ranks x 2 pipeline stages): the same text"
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe --bind-to none -n 4 \
	    $(BIN)/bitnet-worker --model $(DEMO_MODEL) --prompt "Once upon a time" -n 48 --seed 7 --temp 0.8 \
	    --tp 2 --pp 2 --threads 1 --stats

test: deps
	@$(MAKE) --no-print-directory -j2 all cross
	BN_BIN=$(BIN) $(BIN)/bitnet-tests $(T)

# The test runner and library for aarch64 (not the worker: MPI has no cross
# package), built with the Debian cross compiler for tests/test_cross.c, which runs
# the NEON kernels under qemu-user. Never sanitized: ASan does not run under qemu.
CROSS_CC := aarch64-linux-gnu-gcc
cross:
	@$(MAKE) --no-print-directory CC=$(CROSS_CC) SAN= \
	    O=build-aarch64 BIN=bin-aarch64 bin-aarch64/bitnet-tests

# Speed against llama.cpp, same weights (not part of the tests; knobs in bench/README.md).
bench:
	@sh bench/run.sh
	@sh bench/mpi.sh

clean:
	rm -rf build build-san bin bin-san build-aarch64 bin-aarch64

-include $(shell find $(O) -name '*.d' 2>/dev/null)
