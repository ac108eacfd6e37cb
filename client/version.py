"""The version of the installed coolfusion package, as every part of it reports it."""

from importlib import metadata


def _installed_version() -> str:
    try:
        return metadata.version("coolfusion")
    except metadata.PackageNotFoundError:  # a source tree run without installing it
        return "0+unknown"


# Read once at import from the installed package's metadata (pyproject.toml's `version`).
PACKAGE_VERSION = _installed_version()
