"""Model worker: one causal LM behind coolfusion.v1.WorkerService."""
