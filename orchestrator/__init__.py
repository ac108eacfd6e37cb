"""Orchestrator: the Cool-Fusion loop over registered workers, as OrchestratorService."""
