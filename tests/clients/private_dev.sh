# A private /dev for a mount namespace: a tmpfs with the basic nodes bind-mounted (tests/test_desktop.py).
set -e
d=$(mktemp -d /tmp/impv4l2-devns.XXXXXX)
mount -t tmpfs -o mode=755,nosuid devns "$d"
for n in null zero full random urandom tty fuse; do
    if [ -e /dev/$n ]; then touch "$d/$n"; mount --bind /dev/$n "$d/$n"; fi
done
mkdir "$d/shm" "$d/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$d/shm"
mount --bind /dev/pts "$d/pts"
ln -s /proc/self/fd "$d/fd"; ln -s fd/0 "$d/stdin"; ln -s fd/1 "$d/stdout"; ln -s fd/2 "$d/stderr"
mount --move "$d" /dev
rmdir "$d"
echo ready
exec sleep infinity
