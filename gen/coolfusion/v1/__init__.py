"""Generated protobuf and gRPC stubs for coolfusion.v1 (scripts/gen_protos.sh)."""
