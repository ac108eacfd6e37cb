#!/usr/bin/env bash
# Static type check of every coolfusion package with mypy.
#
# The repository's top-level folders are mapped onto the `coolfusion` namespace by pyproject.toml,
# which editable installs implement with an import hook that static checkers cannot follow. This
# script lays the same mapping out as symlinks under .typecheck/ and checks the packages there.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v "${PYTHON:-python3}")
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # absolute: the check runs elsewhere
root=.typecheck/coolfusion
rm -rf .typecheck
mkdir -p "$root"
for package in worker orchestrator calibration constraints gateway client cli serving; do
  ln -s "../../$package" "$root/$package"
done
ln -s ../../gen/coolfusion/v1 "$root/v1"
cd .typecheck
# The cache lives outside .typecheck/, which is laid out anew each time: later checks reuse it.
exec "$python" -m mypy --config-file ../pyproject.toml --cache-dir ../.mypy_cache -p coolfusion.worker -p coolfusion.orchestrator -p coolfusion.calibration -p coolfusion.constraints -p coolfusion.gateway -p coolfusion.client \
  -p coolfusion.cli -p coolfusion.serving "$@"
