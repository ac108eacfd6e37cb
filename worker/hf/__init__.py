"""The transformers backend: Hugging Face models, continuous batching, a KV layout for ragged batches."""
