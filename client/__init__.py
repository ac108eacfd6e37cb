"""Client library and the `coolfusion` command line."""
