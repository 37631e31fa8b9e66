#!/usr/bin/env bash
# Idempotent setup: Debian packages (as root), then the project in .venv/.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
lists=(scripts/apt-runtime.txt)
extra=""
if [[ "${1:-}" == "--test" ]]; then lists+=(scripts/apt-test.txt); extra="[test]"; fi

want=$(grep -hv -e '^#' -e '^$' "${lists[@]}" | sort -u)
missing=$(for p in $want; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [[ -n "$missing" ]]; then
    if [[ $(id -u) -ne 0 ]]; then echo "setup: need root to install: $missing" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

py=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then "$py" -m venv .venv; fi
stamp=.venv/.impv4l2-installed$extra
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".$extra"
    touch "$stamp"
fi
# The mmap shim for CUSE nodes (`impv4l2 run`), built with the system cc into
# .venv/lib/impv4l2/ — only when its source is newer; never shipped prebuilt.
.venv/bin/python -m impv4l2.shim build >/dev/null
