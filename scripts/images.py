"""Build the three images (orchestrator, gateway, worker) with podman, from wheels only.

    python scripts/images.py build [--presets all] [--torch-variant cpu]   # what `make images` runs
    python scripts/images.py wheels     # only fill build/wheelhouse/ (for `docker build` by hand)
    python scripts/images.py sizes      # each image's size and where it comes from
    python scripts/images.py stand-in   # a Debian bookworm base under the public base's tag (root)

`build` first fills build/wheelhouse/ with every wheel the images install, made by this machine's
pip from pyproject.toml and constraints.txt (so a dependency added there reaches the images) and
from the presets' own pip commands (PRESETS in worker/model_files.py); then each Dockerfile
installs from that folder alone, with no network (`podman build --network none`). The worker image
bakes the presets asked for (default: every preset). A rebuilt image replaces the old one, whose
layers are removed when nothing else uses them.

`stand-in` is for machines that cannot reach the public registries: it makes python:3.11-slim-bookworm's
stand-in from Debian's own packages (debootstrap: Debian's Python 3.11 with venv), so that the same
Dockerfiles build. It needs root, debootstrap and a Debian mirror, and takes a few minutes.
docs/deployment.md says what ran where.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / "build" / "wheelhouse"
# The base images' Python: the wheels are made by this one, for it.
IMAGE_PYTHON = (3, 11)
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"  # every Dockerfile's default BASE_IMAGE
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the public base has that a bare Debian root does not: a PATH, a UTF-8 locale, python3 as CMD.
STAND_IN_CONFIG = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]
IMAGES = {"orchestrator": "orchestrator/Dockerfile", "gateway": "gateway/Dockerfile", "worker": "worker/Dockerfile"}
# Where an image's bytes are, below its base: the virtual environment and the baked models.
SIZE_PARTS = ("/opt/coolfusion/venv", "/opt/coolfusion/cache/models/*")


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def tag(image: str) -> str:
    return f"coolfusion-{image}:{version()}"


def run(command: list[str], **options) -> subprocess.CompletedProcess:
    print(f"$ {shlex.join(command)}", flush=True)
    return subprocess.run(command, check=True, **options)


def pip(*args: str) -> None:
    run([sys.executable, "-m", "pip", *args, "--quiet"], cwd=REPO)


def fill_wheelhouse(presets: list[str], torch_index: str | None) -> None:
    """Every wheel the images install: the project with the worker and gateway extras, under the
    constraints, and the packages of `presets`. The folder starts empty, so that it holds exactly
    what this resolution picked (pip's cache makes that cheap)."""
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    WHEELHOUSE.mkdir(parents=True)
    index = ["--extra-index-url", torch_index] if torch_index else []
    pip("wheel", "--wheel-dir", str(WHEELHOUSE), "--constraint", "constraints.txt", *index, ".[worker,gateway]")
    for line in preset_packages(presets):
        pip("wheel", "--wheel-dir", str(WHEELHOUSE), *shlex.split(line))


def preset_packages(presets: list[str]) -> list[str]:
    """Each preset's pip arguments, as the code lists them (scripts/bake_presets.py), read with the
    project just wheeled: this needs no environment of the project's, only its wheel and tqdm's."""
    if not presets:
        return []
    with tempfile.TemporaryDirectory(prefix="coolfusion-presets-") as reader:
        pip(
            "install",
            "--no-index",
            "--find-links",
            str(WHEELHOUSE),
            "--no-deps",
            "--target",
            reader,
            "coolfusion",
            "tqdm",
        )
        listed = subprocess.run(
            [sys.executable, "scripts/bake_presets.py", "packages", *presets],
            cwd=REPO, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": reader},
        )  # fmt: skip
    return listed.stdout.splitlines()


def torch_wheel() -> str:
    [wheel] = [p.name for p in WHEELHOUSE.glob("torch-*.whl")]
    return wheel


def build(presets: list[str], torch_variant: str, torch_index: str | None, base_image: str) -> None:
    """The wheel folder, then the three images; the old image of each tag goes once unused."""
    started = time.monotonic()
    pull_base(base_image)
    fill_wheelhouse(presets, torch_index)
    wheel = torch_wheel()
    if torch_variant == "cpu" and "+cpu" not in wheel:
        raise SystemExit(
            f"the wheel folder holds {wheel}, not torch's CPU build; on a machine whose pip finds the CUDA "
            "build first, pass --torch-index https://download.pytorch.org/whl/cpu"
        )
    print(f"wheels ready in {time.monotonic() - started:.0f} s ({wheel})", flush=True)
    for image, dockerfile in IMAGES.items():
        build_args = {"BASE_IMAGE": base_image}
        if image == "worker":
            build_args |= {"PRESETS": " ".join(presets), "TORCH_VARIANT": torch_variant}
        arguments = [f"--build-arg={name}={value}" for name, value in build_args.items()]
        previous = image_id(tag(image))
        step = time.monotonic()
        # --layers=false: the base plus one layer, and no intermediate image kept as a cache (its key
        # would miss a change in the bind-mounted wheel folder); --force-rm: no build container
        # outlives a failed build.
        build_argv = ["podman", "build", "--network", "none", "--layers=false", "--force-rm", "--file", dockerfile]
        run([*build_argv, *arguments, "--tag", tag(image), "."], cwd=REPO)
        if previous and previous != image_id(tag(image)):
            subprocess.run(["podman", "rmi", previous], check=False, capture_output=True)  # kept while in use
        print(f"{tag(image)} built in {time.monotonic() - step:.0f} s", flush=True)
    print(f"all images built in {time.monotonic() - started:.0f} s", flush=True)
    print_sizes()


def pull_base(base_image: str) -> None:
    """The base image, from the registry unless this machine has it already."""
    if image_id(base_image) is None and subprocess.run(["podman", "pull", base_image], check=False).returncode != 0:
        raise SystemExit(
            f"cannot pull {base_image}; on a machine without access to the registry, make a stand-in "
            "with `python scripts/images.py stand-in` (as root; docs/deployment.md)"
        )


def image_id(reference: str) -> str | None:
    proc = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", reference], check=False, capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_size(reference: str) -> int:
    return int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", reference],
                              check=True, capture_output=True, text=True).stdout)  # fmt: skip


def ulimit_flags() -> list[str]:
    """The most open files and processes this machine allows a container (the hard limits, and the
    kernel's own caps): podman's defaults may ask for more, and the runtime then refuses to start."""
    caps = {
        "nofile": (resource.RLIMIT_NOFILE, "/proc/sys/fs/nr_open"),
        "nproc": (resource.RLIMIT_NPROC, "/proc/sys/kernel/pid_max"),
    }
    flags = []
    for name, (limit, kernel_cap) in caps.items():
        hard, cap = resource.getrlimit(limit)[1], int(Path(kernel_cap).read_text())
        allowed = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        flags += ["--ulimit", f"{name}={allowed}:{allowed}"]
    return flags


def print_sizes(base_image: str = BASE_IMAGE) -> None:
    """Each image's size, and where it comes from: the base, and above it the virtual environment
    and the baked models (du inside the image), with the environment's largest packages."""
    if image_id(base_image):
        print(f"{base_image}: {image_size(base_image) / 1e9:.2f} GB (the base of every image)")
    sizes = f"du -sb {' '.join(SIZE_PARTS)} 2>/dev/null; du -sb /opt/coolfusion/venv/lib/python3*/site-packages/*"
    script = f"{sizes} | sort -n | tail -4"
    runner = ["podman", "run", "--rm", "--network", "none", *ulimit_flags(), "--entrypoint", "sh"]
    for image in IMAGES:
        reference = tag(image)
        inside = [*runner, reference, "-c", script]
        parts = subprocess.run(inside, check=True, capture_output=True, text=True).stdout.splitlines()
        print(f"{reference}: {image_size(reference) / 1e9:.2f} GB")
        for line in parts:
            size, path = line.split("\t")
            print(f"  {int(size) / 1e6:9.0f} MB  {path}")


def stand_in(base_image: str, mirror: str) -> None:
    """A Debian bookworm root with Python 3.11 and venv, imported under `base_image`."""
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing: apt-get install debootstrap (as root)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="coolfusion-stand-in-") as scratch:
        root = Path(scratch) / "root"
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(root), mirror],
            stdout=subprocess.DEVNULL)  # fmt: skip
        for leftover in ("var/cache/apt", "var/lib/apt/lists"):  # package lists, as the public image drops them
            shutil.rmtree(root / leftover)
            (root / leftover).mkdir()
        changes = [arg for change in STAND_IN_CONFIG for arg in ("--change", change)]
        archive = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", *changes, "-", base_image], stdin=archive.stdout, stdout=subprocess.DEVNULL)
        archive.wait()
    print(f"{base_image}: a Debian bookworm stand-in, made in {time.monotonic() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "wheels"):
        command = commands.add_parser(name)
        command.add_argument("--presets", default="all", help="space-separated presets to bake, `all` or ''")
        command.add_argument("--torch-index", help="an extra package index for torch, e.g. PyTorch's CPU index")
        if name == "build":
            command.add_argument("--torch-variant", choices=("cpu", "cuda"), default="cpu")
            command.add_argument("--base-image", default=BASE_IMAGE)
    commands.add_parser("sizes")
    standing_in = commands.add_parser("stand-in")
    standing_in.add_argument("--base-image", default=BASE_IMAGE)
    standing_in.add_argument("--mirror", default=DEBIAN_MIRROR)
    args = parser.parse_args(argv)
    if args.command in ("build", "wheels") and sys.version_info[:2] != IMAGE_PYTHON:
        raise SystemExit(
            f"run this with Python {'.'.join(map(str, IMAGE_PYTHON))}, the images' own: it makes their wheels"
        )
    if args.command == "stand-in":
        stand_in(args.base_image, args.mirror)
    elif args.command == "sizes":
        print_sizes()
    else:
        presets = args.presets.split()
        if args.command == "wheels":
            fill_wheelhouse(presets, args.torch_index)
        else:
            build(presets, args.torch_variant, args.torch_index, args.base_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
