"""Suite-wide pytest wiring.

- ``@pytest.mark.vm`` tests: on the host they are not run natively; one VM (tests/vm/) runs them all
  and each host item reports the guest's outcome. Inside the VM (IMPV4L2_IN_VM=1) they run for
  real and every other test is deselected. See tests/vm/harness.py for the knobs.
- ``@pytest.mark.root`` tests skip (with the reason) when not root or /dev/fuse is missing.
- Every test (host and guest) fails after IMPV4L2_TEST_TIMEOUT seconds (default 300, 0 = off)
  with all thread stacks in its captured stderr, so one hung client cannot eat the CI budget.
- Fixtures: ``backend`` (a sim backend per module), ``loop_hw`` (hot-plug stand-in hardware),
  ``vivid_device`` (vm tests: the in-kernel reference capture node).
- Shared helpers live in tests/support/, client programs in tests/clients/.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest


def _load_vm_module(stem: str):
    # loaded by path: a top-level "vm" package on sys.path would be too easy to shadow;
    # test modules import them as impv4l2_tests_vm_<stem>
    name = f"impv4l2_tests_vm_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "vm" / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_load_vm_module("chroots")  # newer conformance tools (tests/vm/chroots.py), used by the harness
served = _load_vm_module("served")  # the real daemon for vm tests (tests/vm/served.py)
harness = _load_vm_module("harness")
_load_vm_module("mips")  # the mipsel guest (tests/vm/mips.py)
mips_stage = _load_vm_module("mips_stage")  # its boots for tests/mips/test_mips.py, in the background
_VM_RUN = pytest.StashKey["object"]()


def pytest_configure(config: pytest.Config) -> None:
    if harness.IN_VM and os.environ.get("IMPV4L2_VM_OUT"):
        config.pluginmanager.register(harness.GuestReporter(os.environ["IMPV4L2_VM_OUT"]),
                                      "impv4l2-guest-reporter")


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only the selected vm tests go to the VM
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if harness.IN_VM:
        harness.guest_deselect(config, items)
    else:
        config.stash[_VM_RUN] = harness.host_wrap(config, items)
        mips_selected = any(i.get_closest_marker("mips") is not None for i in items)
        if mips_selected and not harness.SKIP_VM and os.environ.get("IMPV4L2_SKIP_MIPS") != "1":
            mips_stage.start()  # TCG uses one core: the boots overlap the host tests


TEST_TIMEOUT = float(os.environ.get("IMPV4L2_TEST_TIMEOUT", "300"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    # a proxy's runtest is the whole VM run, bounded by IMPV4L2_VM_TIMEOUT instead
    # and a mips test's first one boots its guest, bounded by the boot's own timeout
    if TEST_TIMEOUT <= 0 or isinstance(item, harness.VMProxyItem) or item.get_closest_marker("mips"):
        return (yield)

    def expired(signum, frame):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"test exceeded IMPV4L2_TEST_TIMEOUT={TEST_TIMEOUT:.0f} s "
                    "(thread stacks in captured stderr)", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if harness.IN_VM and getattr(getattr(item, "module", None), "served", None) is not served:
        served.stop_shared()  # a module with nodes of its own: no shared daemon beside it
    if item.get_closest_marker("root") is None or isinstance(item, harness.VMProxyItem):
        return
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if lines := mips_stage.summary():
        terminalreporter.write_sep("-", "impv4l2 MIPS stage")
        for line in lines:
            terminalreporter.write_line(line)
    vm = config.stash.get(_VM_RUN, None)
    if vm is None or not vm.done:
        return
    tr = terminalreporter
    tr.write_sep("-", "impv4l2 VM stage")
    bad = vm.error or vm.exit_status != 0 or any(
        t["outcome"] == "failed" for t in vm.results.get("tests", {}).values())
    tr.write_line(vm.summary(keep_log=bool(bad)))
    for module, seconds, n in vm.module_seconds():
        tr.write_line(f"  {seconds:7.1f} s  {n:3d} tests  {module}")
    if bad:
        if vm.error:
            tr.write_line(f"VM stage problem: {vm.error}")
        tr.write_line(f"last {harness.LOG_TAIL_LINES} lines of the VM log:")
        tr.write_line(vm.log_tail())


@pytest.fixture(scope="module")
def backend():
    """A running sim backend at 30 fps, shared by a module's device-model tests
    (modules with other needs define their own ``backend``)."""
    from impv4l2.driver import load_backend

    b = load_backend("sim", fps=30)
    yield b
    b.close()


@pytest.fixture
def loop_hw():
    """A loopN block device the test adds and removes: real uevents standing in for the T31's
    devices (support.hardware.LoopHardware)."""
    from support.hardware import LoopHardware

    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and /dev/loop-control")
    hw = LoopHardware()
    yield hw
    hw.close()


@pytest.fixture(scope="session")
def vivid_device() -> str:
    """/dev/videoN of vivid's capture node (loaded by tests/vm/guest.sh); vm tests only."""
    if not harness.IN_VM:
        pytest.fail("vivid_device is only available inside the VM (mark the test @pytest.mark.vm)")
    for sysdir in sorted(Path("/sys/class/video4linux").glob("video*")):
        if (sysdir / "name").read_text().startswith("vivid") and \
                (sysdir / "index").read_text().strip() == "0":
            return f"/dev/{sysdir.name}"
    pytest.fail("no vivid capture node in /sys/class/video4linux (modprobe vivid failed?)")
