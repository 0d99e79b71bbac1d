"""Generated protobuf and gRPC modules for the negative-queue service (see README.md here)."""
