# Sourced by scripts/demo and scripts/test: make a virtualenv with fastprof and its
# test dependencies. Only needs python3 (>= 3.11) with venv and pip.
#   FASTPROF_VENV   where the virtualenv lives (default: .venv at the repo root)
#   FASTAPI_SPEC    pip requirement for FastAPI (default: newest)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTPROF_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.fastprof-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12) ${FASTAPI_SPEC:-fastapi}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" "${FASTAPI_SPEC:-fastapi}"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
