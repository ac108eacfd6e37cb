"""The vLLM engine behind the worker seam (docs/design.md section 4.7)."""
