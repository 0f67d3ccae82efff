#!/usr/bin/env bash
# Drift seen early: the test suite on the newest releases, before a fresh machine meets them.
#
#   bash scripts/check_latest.sh              # all tests; extra arguments go to pytest, e.g. -m "not slow"
#   bash scripts/check_latest.sh --pin ...    # and, when they pass, move scripts/constraints.txt to those versions
#
# Makes a separate venv (.venv-latest, or PISSA_LATEST_VENV) with the newest releases that
# pyproject's ranges allow, ignoring scripts/constraints.txt, prints each package whose newest
# version differs from its pin, runs the tests there, and prints the ones that fail. Exit status:
# pytest's. torch stays at the CPU pin on Linux (a newer one is a CUDA build of several GB on these
# machines); its newest release on the index is printed beside the pin.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
pin=0
if [ "${1:-}" = --pin ]; then pin=1; shift; fi
venv="${PISSA_LATEST_VENV:-$root/.venv-latest}"
rm -rf "$venv"
PISSA_VENV="$venv" PISSA_CONSTRAINTS=none bash scripts/setup.sh
# shellcheck source=/dev/null
PISSA_VENV="$venv" . scripts/env.sh

echo "== packages whose newest release differs from scripts/constraints.txt"
python scripts/pins.py diff scripts/constraints.txt
newest_torch="$(python -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p' || true)"
echo "  torch newest on the index: ${newest_torch:-unknown}; installed here: $(python -c 'import torch; print(torch.__version__)')"

echo "== the test suite on the newest releases"
set +e
python -m pytest -n "${PISSA_TEST_WORKERS:-2}" --dist loadfile -q -p no:cacheprovider -rfE "$@"
status=$?
set -e
if [ "$status" = 0 ]; then
    echo "check_latest: green on the newest releases"
    if [ "$pin" = 1 ]; then
        python scripts/pins.py write scripts/constraints.txt
        echo "check_latest: review and commit scripts/constraints.txt; bash scripts/test.sh reinstalls from it"
    fi
else
    echo "check_latest: tests fail on the newest releases (the FAILED/ERROR lines above); the pins stay"
fi
exit "$status"
