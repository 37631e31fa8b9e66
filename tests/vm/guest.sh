#!/bin/bash
# Runs inside the virtme-ng guest (vng --exec): bring up the kernel side the vm-marked tests need,
# then run them with pytest. The host reads the outcome from OUTDIR (a --rwdir share), never from
# this script's exit status alone.
#   guest.sh OUTDIR PYTHON [pytest args...]
set -u
out=$1 py=$2
shift 2

echo "impv4l2-vm: guest kernel $(uname -r), uid $(id -u), $(nproc) cpus, up $(cut -d' ' -f1 /proc/uptime) s"

# Kernel modules: cuse for our nodes, vivid as the in-kernel reference camera (one capture node).
# A failure here is printed, not fatal: the tests that need the module fail with their own message.
modprobe cuse || echo "impv4l2-vm: modprobe cuse failed"
modprobe vivid n_devs=1 node_types=0x1 || echo "impv4l2-vm: modprobe vivid failed"

# udev: virtme-ng-init normally starts systemd-udevd; start it ourselves if it did not, then
# replay the events so the rules tests see a fully populated udev database.
if ! pgrep -x systemd-udevd >/dev/null; then
    for d in /lib/systemd/systemd-udevd /usr/lib/systemd/systemd-udevd; do
        [[ -x $d ]] && { $d --daemon; break; }
    done
fi
udevadm trigger --action=add
udevadm settle --timeout=60 || echo "impv4l2-vm: udevadm settle timed out"

# The root filesystem is the host's, read-only except for virtme's overlays (/tmp, /etc, /var, ...
# and the project tree, see harness.py); /tmp is an overlay in guest RAM.
export IMPV4L2_IN_VM=1 IMPV4L2_VM_OUT="$out" TMPDIR=/tmp HOME=/root PYTHONUNBUFFERED=1
export PATH="$(dirname "$py"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

echo "impv4l2-vm: starting pytest, up $(cut -d' ' -f1 /proc/uptime) s"
"$py" -m pytest "$@"
rc=$?
echo "$rc" >"$out/exit-status"
echo "impv4l2-vm: guest pytest exit status $rc"
exit "$rc"
