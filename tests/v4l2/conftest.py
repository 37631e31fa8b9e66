"""Fixtures the device-model tests share: the sim's capture nodes in-process and on a mount."""

from __future__ import annotations

import pytest

from impv4l2.driver import load_backend

from support.mounted import capture_nodes, served_on_mount


@pytest.fixture
def nodes(backend):
    """(main, sub) capture nodes of the module's sim backend, driven in-process."""
    main, sub = capture_nodes(backend)
    for n in (main, sub):
        n.add_waker(lambda: None)
    yield main, sub
    main.close()
    sub.close()


@pytest.fixture(scope="module")
def served():
    """Paths of the main and sub capture nodes of a 25 fps sim, on a FUSE mount."""
    backend = load_backend("sim", fps=25)
    with served_on_mount(capture_nodes(backend), "impv4l2-capture-test-") as paths:
        yield paths
    backend.close()
