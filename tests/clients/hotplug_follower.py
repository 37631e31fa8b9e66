"""A HotplugMonitor with pyudev unimportable, as on the camera: argv[1] names the device; prints
"start", "change ...", and after a line on stdin "stopped <libudev mapped> <pyudev module>"
(tests/test_uevent.py)."""
import sys
sys.modules["pyudev"] = None  # as on the camera: any `import pyudev` fails
from impv4l2 import hotplug
mon = hotplug.HotplugMonitor([sys.argv[1]], lambda p, d: print("change", p, d, flush=True))
print("start", mon.start(), flush=True)
sys.stdin.readline()
mon.stop()
maps = open("/proc/self/maps").read()
print("stopped", "libudev" in maps, sys.modules["pyudev"], flush=True)
