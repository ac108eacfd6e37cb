"""gRPC server plumbing shared by the worker and the orchestrator."""
