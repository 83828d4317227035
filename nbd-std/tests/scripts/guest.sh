#!/usr/bin/env bash
# Builds what a Linux guest of the kernel-client and VM-boot tests boots
# from, under a cache directory (build artifacts, never committed):
#
#   guest.sh prepare DIR        Debian's kernel (the linux-image package that
#                               linux-image-amd64 depends on, fetched once with
#                               apt-get download) as DIR/vmlinuz, and
#                               DIR/initramfs.cpio.gz: busybox-static, the
#                               kernel's nbd, ext4, virtio and e1000 modules,
#                               Debian's nbd-client and mkfs.ext4 with their
#                               libraries and loader, and guest/init as /init.
#   guest.sh pack SRC OUT       SRC's files as a gzipped newc cpio archive,
#                               appended by the tests to the initramfs (the
#                               kernel unpacks concatenated archives in turn).
#   guest.sh rootfs OUT SIZE    an ext4 image (mkfs.ext4 -d) holding busybox
#                               and guest/root-init as /sbin/init: the root
#                               filesystem of the VM-boot tests.
#
# Needs dpkg-deb, apt-get (first run only), busybox-static, nbd-client,
# e2fsprogs and gzip on the host.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
busybox=/bin/busybox

# What the guest loads: the block driver, ext4 and its checksum module
# (crc32c is looked up by name at mount time, so modprobe does not pull
# it in), the virtio disk and both NIC drivers QEMU may give it.
modules=(nbd ext4 crc32c_generic virtio_pci virtio_blk virtio_net e1000)

die() {
    echo "guest.sh: $*" >&2
    exit 1
}

kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

# DIR/kernel/ holds the unpacked package; DIR/vmlinuz and DIR/version name it.
prepare_kernel() {
    local dir=$1
    if [[ -s $dir/vmlinuz && -s $dir/version ]]; then
        return
    fi
    local package
    package=$(kernel_package)
    [[ -n $package ]] || die "apt-cache knows no linux-image-amd64 (apt-get update?)"
    rm -rf "$dir/kernel" "$dir/download"
    mkdir -p "$dir/download"
    (cd "$dir/download" && apt-get download "$package" >/dev/null)
    dpkg-deb -x "$dir"/download/*.deb "$dir/kernel"
    rm -rf "$dir/download"
    local version
    version=$(basename "$(ls -d "$dir"/kernel/lib/modules/*/)")
    # The package ships no modules.dep: busybox makes one.
    "$busybox" depmod -b "$dir/kernel" "$version"
    cp "$dir/kernel/boot/vmlinuz-$version" "$dir/vmlinuz"
    echo "$version" >"$dir/version"
}

# Every module `name` needs, itself included, as paths relative to the
# modules directory (from modules.dep: "path: dep dep ...").
module_closure() {
    local moddir=$1 name=$2
    awk -v name="$name" -F': *' '
        {
            file = $1; sub(/.*\//, "", file); sub(/\.ko.*$/, "", file)
            gsub(/-/, "_", file)
            if (file == name) { print $1; n = split($2, deps, " "); for (i = 1; i <= n; i++) print deps[i]; exit }
        }' "$moddir/modules.dep"
}

# A program and every library ldd lists, plus the loader, into ROOT.
copy_program() {
    local root=$1 program=$2
    mkdir -p "$root$(dirname "$program")"
    cp -L "$program" "$root$program"
    local library
    for library in $(ldd "$program" | awk '/=> \// { print $3 } /^\t\/lib/ { print $1 }'); do
        mkdir -p "$root$(dirname "$library")"
        cp -L "$library" "$root$library"
    done
}

# Whether DIR/initramfs.cpio.gz is newer than everything it is made of.
initramfs_up_to_date() {
    local dir=$1 out=$1/initramfs.cpio.gz source
    [[ -s $out ]] || return 1
    for source in "${BASH_SOURCE[0]}" "$here/guest/init" "$dir/version" "$busybox" \
        "$(command -v nbd-client || echo /usr/sbin/nbd-client)" /usr/sbin/mke2fs; do
        [[ $source -nt $out ]] && return 1
    done
    return 0
}

prepare_initramfs() {
    local dir=$1 version root
    initramfs_up_to_date "$dir" && return
    version=$(cat "$dir/version")
    root=$dir/initramfs
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,test,lib/modules/"$version"}
    cp "$busybox" "$root/bin/busybox"
    local applet
    for applet in $("$busybox" --list); do
        [[ -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
    done
    local kernel_modules=$dir/kernel/lib/modules/$version module path
    for module in "${modules[@]}"; do
        for path in $(module_closure "$kernel_modules" "$module"); do
            mkdir -p "$root/lib/modules/$version/$(dirname "$path")"
            cp "$kernel_modules/$path" "$root/lib/modules/$version/$path"
        done
    done
    cp "$kernel_modules"/modules.{builtin,order} "$root/lib/modules/$version/"
    "$busybox" depmod -b "$root" "$version"
    copy_program "$root" "$(command -v nbd-client || echo /usr/sbin/nbd-client)"
    copy_program "$root" /usr/sbin/mke2fs
    ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
    [[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$root/etc/"
    # Both lib directories: the loader path of x86_64 binaries is /lib64.
    [[ -e $root/lib64 ]] || ln -s lib "$root/lib64"
    cp "$here/guest/init" "$root/init"
    chmod 755 "$root/init"
    pack "$root" "$dir/initramfs.cpio.gz"
}

pack() {
    local source=$1 out=$2
    (cd "$source" && find . -mindepth 1 | "$busybox" cpio -o -H newc 2>/dev/null) \
        | gzip -1 >"$out.tmp"
    mv "$out.tmp" "$out"
}

rootfs() {
    local out=$1 size=$2 tree
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' RETURN
    mkdir -p "$tree"/{bin,sbin,etc,proc,sys,dev,tmp,var/log}
    cp "$busybox" "$tree/bin/busybox"
    local applet
    for applet in $("$busybox" --list); do
        [[ -e $tree/bin/$applet ]] || ln -s busybox "$tree/bin/$applet"
    done
    cp "$here/guest/root-init" "$tree/sbin/init"
    chmod 755 "$tree/sbin/init"
    echo "booted from an NBD export" >"$tree/etc/motd"
    rm -f "$out"
    mkfs.ext4 -q -F -L nbd-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$tree" "$out" "$size"
}

case ${1:-} in
    prepare)
        [[ $# -eq 2 ]] || die "usage: guest.sh prepare DIR"
        [[ -x $busybox ]] && "$busybox" --list | grep -x depmod >/dev/null \
            || die "busybox-static is missing (apt-get install busybox-static)"
        mkdir -p "$2"
        # One build at a time (test processes may share DIR).
        exec 9>"$2/.lock"
        flock 9
        prepare_kernel "$2"
        prepare_initramfs "$2"
        ;;
    pack)
        [[ $# -eq 3 ]] || die "usage: guest.sh pack SRC OUT"
        pack "$2" "$3"
        ;;
    rootfs)
        [[ $# -eq 3 ]] || die "usage: guest.sh rootfs OUT SIZE"
        rootfs "$2" "$3"
        ;;
    *)
        die "usage: guest.sh prepare DIR | pack SRC OUT | rootfs OUT SIZE"
        ;;
esac
