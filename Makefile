PYTHON ?= .venv/bin/python

# Regenerate the checked-in gRPC code from rpc/pallax.proto (needs grpcio-tools).
# The proto is mapped to pallax/rpc/pallax.proto so the generated modules import each other as
# `pallax.rpc.pallax_pb2`; they are written to a scratch folder and copied into rpc/.
.PHONY: proto
proto:
	rm -rf .proto_out && mkdir -p .proto_out
	$(PYTHON) -m grpc_tools.protoc -Ipallax/rpc=rpc --python_out=.proto_out --pyi_out=.proto_out \
		--grpc_python_out=.proto_out rpc/pallax.proto
	cp .proto_out/pallax/rpc/pallax_pb2.py .proto_out/pallax/rpc/pallax_pb2.pyi \
		.proto_out/pallax/rpc/pallax_pb2_grpc.py rpc/
	rm -rf .proto_out
