# Sourced by scripts/demo and scripts/test: make ./.venv with overstory installed.
# Needs only python3 (3.11+) with venv; everything else comes from PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "overstory needs Python 3.11+ (found $("$PY" --version))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
# ".[]" is not a valid requirement: name the extras only when there are some.
spec="."
if [ -n "${EXTRAS:-}" ]; then spec=".[${EXTRAS}]"; fi
.venv/bin/python -m pip install --quiet -e "$spec"
.venv/bin/python -c 'import overstory' # fail here, not later, if the install did not work
