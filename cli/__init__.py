"""The `coolfusion` command line and its tooling: local clusters, rendering, eval, bench and problem sets."""
