#!/usr/bin/env bash
# Runs the same `coolfusion bench` against a past revision and then the working tree, one after
# the other on this machine, so that their figures can be set side by side (docs/performance.md).
# The past revision runs from a temporary git worktree through a namespace layout on PYTHONPATH
# (the installed package points at this working tree); it uses this virtualenv's libraries.
#
# Usage: scripts/compare_revisions.sh REV [bench flags...]
#   e.g. scripts/compare_revisions.sh 77c4c54 --local --skip-no-cache --lengths 32 --concurrency 1,4,8
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$1
shift
python=$(command -v "${PYTHON:-.venv/bin/python}")
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/tree" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git worktree add --detach "$tmp/tree" "$rev" >/dev/null 2>&1
mkdir -p "$tmp/path/coolfusion"
for package in worker orchestrator gateway client cli serving; do
  if [ -d "$tmp/tree/$package" ]; then ln -s "$tmp/tree/$package" "$tmp/path/coolfusion/$package"; fi
done
ln -s "$tmp/tree/gen/coolfusion/v1" "$tmp/path/coolfusion/v1"
cli=coolfusion.cli.main
[ -f "$tmp/tree/cli/main.py" ] || cli=coolfusion.client.cli  # before the command line moved to cli/

echo "== $rev ($(git log -1 --format='%h %s' "$rev"))"
(cd "$tmp/tree" && PYTHONPATH="$tmp/path" "$python" -m "$cli" bench "$@")
echo
echo "== working tree ($(git log -1 --format='%h' HEAD) + changes)"
"$python" -m coolfusion.cli.main bench "$@"
