# A server restart under a mounted filesystem. nbd-client in ioctl mode
# with -persist (HOST PORT ARGUMENTS... from /test/client) on /dev/nbd0;
# mkfs.ext4, mount, then a writer creates 256 KiB files and syncs each
# one, printing "nbd-synced PATH SHA256" once the sync returned. After
# "nbd-writer running" the host stops the server (SIGTERM) and starts it
# again on the same port and file. The guest reports what the writer saw,
# the kernel's nbd and ext4 messages, whether the device answers again
# (nbd-client -persist reconnecting), and whether a fresh mount reads the
# synced files back after a reconnection ("nbd-reread ok|failed"). The
# host asserts on these lines; the script itself exits 0.

now() { cut -d' ' -f1 /proc/uptime; }

# nbd-client returns (or forks) before the kernel shows the device's size.
wait_for_size() {
    n=0
    while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
        n=$((n + 1))
        [ $n -gt 100 ] && return 1
        sleep 0.1
    done
}
files=400

# -nofork keeps nbd-client's own messages on the console.
nbd-client $(cat /test/client) /dev/nbd0 -L -persist -nofork 2>&1 | sed 's/^/nbd-client: /' &
wait_for_size || exit 1
mkfs.ext4 -q -F /dev/nbd0 || exit 2
mount -t ext4 /dev/nbd0 /mnt || exit 3
mkdir -p /mnt/writer || exit 4
sync

start=$(now)
i=0
writer_status=0
: >/tmp/synced
while [ $i -lt $files ]; do
    path=/mnt/writer/file-$i
    if ! head -c 262144 /dev/urandom >$path 2>/dev/null; then
        echo "nbd-writer error writing file-$i at $(now) s"
        writer_status=1
        break
    fi
    sum=$(sha256sum $path | cut -d' ' -f1)
    if ! sync $path 2>/dev/null; then
        echo "nbd-writer error syncing file-$i at $(now) s"
        writer_status=1
        break
    fi
    echo "nbd-synced /writer/file-$i $sum"
    echo "$sum  writer/file-$i" >>/tmp/synced
    [ $i -eq 3 ] && echo "nbd-writer running at $(now) s"
    i=$((i + 1))
done
echo "nbd-writer finished with status $writer_status after $i files, $(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"

umount /mnt 2>/dev/null || umount -l /mnt
# Does the -persist client bring the device back once the server is up?
lost=$(now)
back=no
n=0
while [ $n -lt 30 ]; do
    if [ "$(cat /sys/block/nbd0/size)" != 0 ] && dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 2>/dev/null; then
        back=yes
        break
    fi
    sleep 0.5
    n=$((n + 1))
done
echo "nbd-device answers again: $back, after $(awk -v a="$lost" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
if [ $back = no ]; then
    # What a user does next: connect again by hand.
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
    if nbd-client $(cat /test/client) /dev/nbd0 -L && wait_for_size; then
        echo "nbd-reconnected by hand"
    else
        echo "nbd-reconnect by hand failed"
    fi
fi
# A fresh mount replays the journal: the synced files must all be there.
if mount -t ext4 /dev/nbd0 /mnt; then
    if (cd /mnt && sha256sum -c -s /tmp/synced); then
        echo "nbd-reread ok: $(wc -l </tmp/synced) synced files intact after a fresh mount"
    else
        echo "nbd-reread failed: synced files differ"
    fi
    umount /mnt
else
    echo "nbd-reread failed: no fresh mount"
fi
dmesg | grep -E 'nbd|EXT4|JBD2' | grep -v 'Buffer I/O error' | sed 's/^/nbd-dmesg /' | head -40
nbd-client -d /dev/nbd0
exit 0
