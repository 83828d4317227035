# The kernel client's workflow, once per line of /test/sessions:
#   NAME DEVICE NBD-CLIENT-ARGUMENTS...
# connect, mkfs.ext4, mount, directories, random data and small files,
# sync, unmount, drop caches, mount read-only, compare checksums,
# disconnect. Prints "nbd-session NAME ok" (or "failed: STEP") and every
# file's checksum as "nbd-sum NAME SHA256 PATH" for the host to compare.
# Run by /init with sh; the host reads the serial console.

now() { cut -d' ' -f1 /proc/uptime; }

session() {
    name=$1 device=/dev/$2
    shift 2
    start=$(now)
    nbd-client "$@" "$device" || return 1
    # Netlink connects return before the size is visible to the block layer.
    attempt=0
    while [ "$(cat /sys/block/${device#/dev/}/size)" = 0 ] && [ $attempt -lt 50 ]; do
        sleep 0.2
        attempt=$((attempt + 1))
    done
    echo "nbd-step $name connected: $(cat /sys/block/${device#/dev/}/size) sectors, logical block $(cat /sys/block/${device#/dev/}/queue/logical_block_size)"
    mkfs.ext4 -q -F "$device" || return 2
    mount -t ext4 "$device" /mnt || return 3
    mkdir -p /mnt/data/small /mnt/data/deep/er/still || return 4
    head -c 4194304 /dev/urandom >/mnt/data/random.bin || return 4
    head -c 1000000 /dev/urandom >/mnt/data/deep/er/still/odd-size.bin || return 4
    i=0
    while [ $i -lt 100 ]; do
        head -c $((i * 37 + 1)) /dev/urandom >/mnt/data/small/file-$i || return 4
        i=$((i + 1))
    done
    (cd /mnt && find data -type f | sort | xargs sha256sum) >/tmp/sums || return 5
    sync
    umount /mnt || return 6
    echo 3 >/proc/sys/vm/drop_caches
    mount -t ext4 -o ro "$device" /mnt || return 7
    (cd /mnt && sha256sum -c -s /tmp/sums) || return 8
    umount /mnt || return 9
    nbd-client -d "$device" || return 10
    while read -r sum path; do
        echo "nbd-sum $name $sum /$path"
    done </tmp/sums
    echo "nbd-step $name took $(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
}

failures=0
while read -r line; do
    set -- $line
    name=$1
    session "$@"
    status=$?
    if [ $status -eq 0 ]; then
        echo "nbd-session $name ok"
    else
        echo "nbd-session $name failed at step $status"
        failures=$((failures + 1))
    fi
done </test/sessions
exit $failures
