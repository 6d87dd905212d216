#!/usr/bin/env bash
# kernel-vm.sh — run one command inside a throw-away QEMU VM whose kernel has a pure cgroup v2
# hierarchy (cgroup_no_v1=all: cpu, io, memory, pids ... at /sys/fs/cgroup), then exit with the
# command's status. This is how jobworker's kernel tier runs on hosts where cgroup v1 owns the
# controllers (see docs/limits.md).
#
#   usage: scripts/kernel-vm.sh [--] COMMAND [ARGS...]
#   e.g.   scripts/kernel-vm.sh -- "$PWD/.venv/bin/python" -m pytest -m kernel tests/kernel
#
# Guest view: the host's / read-only (virtio-9p) under a tmpfs overlay (writable, thrown away),
# fresh tmpfs /tmp and /run, the repository (JW_VM_SHARE) read-write at the same path, a scratch
# ext4 disk /dev/vda mounted at /scratch (io.max needs a real block device; 9p is not one), no
# network but loopback. The command runs as root in $PWD with this shell's environment and
# stdin=/dev/null; its stdout+stderr stream to our stdout.
#
# First use installs qemu-system-x86 with apt and unpacks (does not install) the Debian kernel
# and busybox-static into the cache. Concurrent runs share the cache safely (flock).
#
# Knobs (defaults):
#   JW_VM_CACHE=${XDG_CACHE_HOME:-~/.cache}/jobworker/kernel-vm   kernel, busybox, initramfs
#   JW_VM_ACCEL=auto      auto|kvm|tcg; auto probes KVM once and caches the answer
#   JW_VM_MEM=1024 (MiB)  JW_VM_SMP=2  JW_VM_TIMEOUT=1200 (s, whole VM)
#   JW_VM_SHARE=<repo>    host directory shared read-write at the same path
#   JW_VM_DISK_MB=64      scratch disk size; 0 = no disk
#   JW_VM_CGROUP=         run the command in this child cgroup (e.g. test.slice/runner.service)
#                         with controllers enabled only down to its parent, as systemd does for
#                         a Delegate=yes service; default: the root cgroup
#   JW_VM_KERNEL_PKG=linux-image-amd64   JW_VM_VERBOSE=0 (1: print the guest console after)
# Exit status: the command's; 125 when the VM itself failed or timed out.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${JW_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/jobworker/kernel-vm}
ACCEL=${JW_VM_ACCEL:-auto}
MEM=${JW_VM_MEM:-1024}
SMP=${JW_VM_SMP:-2}
TIMEOUT=${JW_VM_TIMEOUT:-1200}
SHARE=$(realpath "${JW_VM_SHARE:-$REPO}")
DISK_MB=${JW_VM_DISK_MB:-64}
CGROUP=${JW_VM_CGROUP:-}
KPKG=${JW_VM_KERNEL_PKG:-linux-image-amd64}

[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then sed -n '2,29s/^# \{0,1\}//p' "$0" >&2; exit 2; fi
case "$CGROUP" in /* | *..* | *' '*) echo "JW_VM_CGROUP must be a relative path" >&2; exit 2 ;; esac

log() { echo "[kernel-vm] $*" >&2; }
SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
apt_updated=
apt_update() { [ -n "$apt_updated" ] || { $SUDO apt-get update -qq >&2; apt_updated=1; }; }

# ------------------------------------------------------------------------------------- host setup
ensure_qemu() {
  command -v qemu-system-x86_64 >/dev/null && return
  log "installing qemu-system-x86 (first use) ..."
  apt_update
  $SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
}

# The Debian kernel and busybox are unpacked, never installed: the host stays as it is.
ensure_kernel() {
  [ -e "$CACHE/kernel.ok" ] && return
  log "fetching $KPKG + busybox-static into $CACHE (first use) ..."
  rm -rf "$CACHE/kernel" "$CACHE/dl"
  mkdir -p "$CACHE/dl"
  (
    cd "$CACHE/dl"
    # apt-get download as root warns that it cannot drop privileges: harmless here.
    # Stale package lists name versions the mirror no longer has: update once and retry.
    fetch() {
      apt-get download -q "$@" 2>&1 | grep -v unsandboxed >&2 || true
      # shellcheck disable=SC2086 # the patterns are globbed on purpose
      ls ${@/%/_*.deb} > /dev/null 2>&1 || { apt_update && apt-get download -q "$@" >&2; }
    }
    apt-cache show "$KPKG" > /dev/null 2>&1 || apt_update
    fetch "$KPKG" busybox-static
    real=$(dpkg-deb -f "$KPKG"_*.deb Depends | grep -o 'linux-image-[0-9][^ ,(]*' | head -1)
    [ -n "$real" ] || { log "cannot tell which kernel $KPKG depends on"; exit 1; }
    fetch "$real"
    dpkg-deb -x "$real"_*.deb ../kernel
    mkdir bb && dpkg-deb -x busybox-static_*.deb bb && cp bb/bin/busybox ../busybox
  )
  rm -rf "$CACHE/dl"
  local kv
  kv=$(ls "$CACHE/kernel/lib/modules")
  "$CACHE/busybox" depmod -b "$CACHE/kernel" "$kv" # the .deb ships no modules.dep
  touch "$CACHE/kernel.ok"
}

# Runs in the guest as PID 1 (busybox sh). Mounts the host root read-only under an overlay,
# a pure cgroup2 at /sys/fs/cgroup, the share and the scratch disk, then runs cmd.sh chrooted.
guest_init() {
  cat <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null || echo "kernel-vm: insmod $m failed"; done < /modules.list
fail() { echo "KERNEL-VM-INIT-FAILED: $*"; reboot -f; }
mkdir -p /lower /ctl /ovl /newroot
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O,ro,cache=loose hostroot /lower || fail "9p host root"
mount -t 9p -o $O ctl /ctl || fail "9p ctl"
. /ctl/run.conf
mount -t tmpfs -o mode=755 ovl /ovl && mkdir /ovl/u /ovl/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/ovl/u,workdir=/ovl/w /newroot || fail overlay
R=/newroot
mount -t proc proc $R/proc; mount -t sysfs sysfs $R/sys
# nsdelegate + memory_recursiveprot: the options systemd mounts cgroup2 with.
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup || fail cgroup2
mount -t devtmpfs dev $R/dev; mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o ptmxmode=666 devpts $R/dev/pts; mount -t tmpfs shm $R/dev/shm
mount -t tmpfs -o mode=1777 tmp $R/tmp; mount -t tmpfs -o mode=755 run $R/run
mkdir -p $R/run/kernel-vm && mount --bind /ctl $R/run/kernel-vm
mkdir -p "$R$SHARE" && mount -t 9p -o $O,cache=mmap share "$R$SHARE" || fail "9p share"
if [ -n "$DISK" ]; then
  [ -b /dev/vda ] || fail "no scratch disk /dev/vda"
  mkdir -p $R/scratch && mount -t ext4 /dev/vda $R/scratch || fail "scratch disk"
fi
ip link set lo up; hostname kernel-vm
OUT=/dev/null
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name 2>/dev/null)" = kernel-vm.out ] && OUT=/dev/${p##*/}
done
CG=$R/sys/fs/cgroup
if [ -n "$CGROUP" ]; then
  # Delegated mode: controllers enabled from the root down to CGROUP's parent only.
  d=$CG; ctrls=$(sed 's/\([^ ]*\)/+\1/g' $d/cgroup.controllers)
  for part in $(echo "$CGROUP" | tr / ' '); do
    echo "$ctrls" > $d/cgroup.subtree_control || fail "subtree_control in $d"
    d=$d/$part; mkdir -p $d
  done
fi
echo "KERNEL-VM-START uptime=$(cut -d' ' -f1 /proc/uptime)"
sh -c 'echo $$ > "$1/cgroup.procs" && exec chroot /newroot /bin/bash /run/kernel-vm/cmd.sh' _ "$CG/$CGROUP" \
  < /dev/null > $OUT 2>&1
rc=$?
echo $rc > /ctl/rc; sync
echo "KERNEL-VM-EXIT=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
reboot -f
INIT
}

MODULES="drivers/virtio/virtio_pci net/9p/9pnet_virtio fs/9p/9p fs/overlayfs/overlay
  drivers/char/virtio_console drivers/char/hw_random/virtio-rng drivers/block/virtio_blk
  crypto/crc32c_generic fs/ext4/ext4"

# The initramfs is rebuilt whenever this script's guest side changes (its hash is in the name).
ensure_initramfs() {
  local kdir=$1 kv=$2 tag w m dep
  tag=$( { guest_init; echo "$MODULES"; } | sha256sum | cut -c1-12)
  INITRD=$CACHE/initramfs-$kv-$tag.cpio.gz
  [ -e "$INITRD" ] && return
  log "building initramfs for $kv ..."
  w=$(mktemp -d "$CACHE/ir.XXXX")
  mkdir -p "$w"/{bin,lib/modules,proc,sys,dev}
  cp "$CACHE/busybox" "$w/bin/busybox"
  guest_init > "$w/init" && chmod +x "$w/init"
  declare -A seen=()
  local order=()
  add() {
    local mod=$1
    [ -n "${seen[$mod]:-}" ] && return
    seen[$mod]=1
    for dep in $(grep "^$mod:" "$kdir/modules.dep" | cut -d: -f2); do add "$dep"; done
    order+=("$mod")
  }
  for m in $MODULES; do
    # Built in on some kernels: then there is no .ko and nothing to load.
    [ -e "$kdir/kernel/$m.ko" ] && add "kernel/$m.ko"
  done
  for m in "${order[@]}"; do
    cp "$kdir/$m" "$w/lib/modules/"
    basename "$m"
  done > "$w/modules.list"
  (cd "$w" && find . | "$CACHE/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  rm -rf "$w"
}

pick_accel() {
  [ "$ACCEL" = auto ] || return 0
  if [ -s "$CACHE/accel" ]; then
    ACCEL=$(cat "$CACHE/accel")
    return
  fi
  ACCEL=tcg
  if [ -w /dev/kvm ]; then
    # /dev/kvm can exist yet not boot a stock kernel (e.g. nested kvm_pvm): try a tiny guest.
    # Whatever qemu does (abort with SIGABRT, hang, exit non-zero) must not end this script:
    # under `set -e` a failing command ends a subshell too, so the status is caught with `||`.
    # The subshell runs in the probe directory with core dumps off, and its stderr (where bash
    # reports "Aborted") goes to the probe's log, not the user's terminal.
    log "probing KVM ..."
    local p prc=0
    p=$(mktemp -d "$CACHE/probe.XXXX")
    mkdir -p "$p/root/bin" && cp "$CACHE/busybox" "$p/root/bin/"
    printf '#!/bin/busybox sh\n/bin/busybox echo KERNEL-VM-KVM-OK\n/bin/busybox reboot -f\n' > "$p/root/init"
    chmod +x "$p/root/init"
    (cd "$p/root" && find . | "$CACHE/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$p/i.gz"
    (
      cd "$p" && ulimit -c 0
      timeout -k 5 20 qemu-system-x86_64 -nodefaults -display none -no-reboot -accel kvm \
        -cpu host -m 256 -kernel "$VMLINUZ" -initrd "$p/i.gz" -append "console=ttyS0 panic=-1" \
        -serial "file:$p/log" < /dev/null > "$p/qemu.out" 2>&1
    ) 2> "$p/sh.err" || prc=$?
    if grep -aq KERNEL-VM-KVM-OK "$p/log" 2> /dev/null; then
      ACCEL=kvm
    else
      log "KVM probe failed (qemu status $prc; 124 = timeout, 134 = abort): using tcg"
    fi
    rm -rf "$p"
  fi
  echo "$ACCEL" > "$CACHE/accel"
  log "accelerator: $ACCEL (cached in $CACHE/accel)"
}

mkdir -p "$CACHE"
ensure_qemu
exec 9> "$CACHE/.lock"
flock 9 # one setup at a time; runs themselves are independent
ensure_kernel
KV=$(ls "$CACHE/kernel/lib/modules")
KDIR=$CACHE/kernel/lib/modules/$KV
VMLINUZ=$CACHE/kernel/boot/vmlinuz-$KV
ensure_initramfs "$KDIR" "$KV"
pick_accel
flock -u 9
exec 9>&-

# ---------------------------------------------------------------------------------- one run
RUN=$(mktemp -d "${TMPDIR:-/tmp}/jobworker-vm.XXXXXX")
CAT=
cleanup() {
  [ -n "$CAT" ] && kill "$CAT" 2> /dev/null
  rm -rf "$RUN"
}
trap cleanup EXIT

{
  echo "SHARE=$(printf %q "$SHARE")"
  echo "CGROUP=$(printf %q "$CGROUP")"
  echo "DISK=$([ "$DISK_MB" -gt 0 ] && echo 1)"
} > "$RUN/run.conf"
{
  echo '#!/bin/bash'
  export -p | grep -v -E '^(declare -x|export) (PWD|OLDPWD|SHLVL|_|TERM|HOSTNAME)='
  printf 'cd %q || exit 126\nexec' "$PWD"
  printf ' %q' "$@"
  echo
} > "$RUN/cmd.sh"

DISK_ARGS=()
if [ "$DISK_MB" -gt 0 ]; then
  truncate -s "${DISK_MB}M" "$RUN/disk.img"
  mkfs.ext4 -q -F "$RUN/disk.img"
  DISK_ARGS=(-drive "file=$RUN/disk.img,format=raw,if=none,id=d0,cache=unsafe"
    -device virtio-blk-pci,drive=d0)
fi
if [ "$ACCEL" = kvm ]; then ACC=(-accel kvm -cpu host); else ACC=(-accel tcg,thread=multi -cpu max); fi
APPEND="console=ttyS0 quiet loglevel=4 panic=-1 cgroup_no_v1=all random.trust_cpu=on"

# Guest output: virtio-serial port -> FIFO -> our stdout, streamed while the command runs.
mkfifo "$RUN/out.fifo"
cat "$RUN/out.fifo" &
CAT=$!
exec 8<> "$RUN/out.fifo" # a writer of our own, so cat cannot block if qemu never opens the FIFO
T0=$(date +%s.%N)
set +e
timeout --foreground "$TIMEOUT" qemu-system-x86_64 \
  -nodefaults -no-user-config -display none -monitor none -no-reboot \
  -kernel "$VMLINUZ" -initrd "$INITRD" -append "$APPEND" -m "$MEM" -smp "$SMP" "${ACC[@]}" \
  -serial "file:$RUN/console.log" \
  -fsdev local,id=r,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=r,mount_tag=hostroot \
  -fsdev local,id=c,path="$RUN",security_model=none,multidevs=remap \
  -device virtio-9p-pci,fsdev=c,mount_tag=ctl \
  -fsdev local,id=s,path="$SHARE",security_model=none,multidevs=remap \
  -device virtio-9p-pci,fsdev=s,mount_tag=share \
  -device virtio-rng-pci "${DISK_ARGS[@]}" \
  -device virtio-serial-pci -chardev file,id=out,path="$RUN/out.fifo" \
  -device virtserialport,chardev=out,name=kernel-vm.out < /dev/null 8>&-
qrc=$?
exec 8>&-
wait "$CAT"
CAT=
set -e
T1=$(date +%s.%N)
[ "${JW_VM_VERBOSE:-0}" = 1 ] && { log "---- guest console ----"; cat "$RUN/console.log" >&2; }
if [ -s "$RUN/rc" ]; then
  rc=$(cat "$RUN/rc")
else
  rc=125
  log "VM failed (qemu rc=$qrc; 124 = timeout after ${TIMEOUT}s). Console tail:"
  tail -n 30 "$RUN/console.log" >&2 2> /dev/null || true
fi
log "kernel=$KV accel=$ACCEL cgroup=/${CGROUP} exit=$rc vm_wall=$(awk "BEGIN{printf \"%.1f\", $T1 - $T0}")s"
exit "$rc"
