"""Where things are, for tests in any directory."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent  # the repository (PYTHONPATH for client programs)
CLIENTS = TESTS / "clients"  # client programs run as subprocesses
FAKES = TESTS / "fakes"  # the fake libimp
