"""The OpenAI-compatible HTTP gateway: translates OpenAI API calls into OrchestratorService calls."""
