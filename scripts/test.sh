#!/usr/bin/env bash
# The whole test suite in one command: install what the tests need, then ONE pytest run over
# tests/ (the real-kernel VM stage boots inside that run, see tests/vm/harness.py).
#   scripts/test.sh                 everything
#   scripts/test.sh -k foo -x       extra arguments go to pytest
#   IMPV4L2_SKIP_VM=1 scripts/test.sh   skip (not fail) the vm tests when no VM can boot
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"  # vng starts virtme-run through PATH
exec .venv/bin/python -m pytest "$@"
