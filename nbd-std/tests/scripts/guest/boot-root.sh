# Sourced by the initramfs' /init (PID 1): mounts the virtio disk
# (QEMU's nbd:// drive) as the root filesystem and hands over to its
# /sbin/init.
modprobe virtio_blk
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    [ -b /dev/vda ] && break
    sleep 0.5
done
mkdir -p /newroot
if mount -t ext4 -o ro /dev/vda /newroot; then
    echo "nbd-guest: switching root to /dev/vda"
    umount /proc /sys
    umount /dev
    exec switch_root /newroot /sbin/init
fi
echo "nbd-guest: cannot mount /dev/vda"
