"""The version of the installed coolfusion package, as the servers report it (GetInfo, ListWorkers).

The client library reads the same metadata on its own (client/version.py): servers never import it.
"""

from importlib import metadata

try:  # read once, from the installed package's metadata (pyproject.toml's `version`)
    SERVER_VERSION = metadata.version("coolfusion")
except metadata.PackageNotFoundError:  # a source tree run without installing it
    SERVER_VERSION = "0+unknown"
