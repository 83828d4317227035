# Sourced by the initramfs' /init (PID 1): mounts the virtio disk
# (QEMU's nbd:// drive) as the root filesystem and hands over to its
# /sbin/init.
modprobe virtio_blk
attempt=0
while [ ! -b /dev/vda ] && [ $attempt -lt 40 ]; do
    sleep 0.5
    attempt=$((attempt + 1))
done
mkdir -p /newroot
if mount -t ext4 -o ro /dev/vda /newroot; then
    echo "nbd-guest: switching root to /dev/vda"
    umount /proc /sys
    umount /dev
    exec switch_root /newroot /sbin/init
fi
echo "nbd-guest: cannot mount /dev/vda"
