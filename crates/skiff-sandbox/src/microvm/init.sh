#!/bin/busybox sh
# Skiff microVM init (PID 1 in the initramfs): load the virtio drivers, mount the root and
# code disks, find the agent's virtio-serial port, set up the network and hand over to the
# agent. Quiet on success; any failure prints `skiff-init: <reason>` and powers off.
B=/bin/busybox

fail() {
	echo "skiff-init: $*" >/dev/console
	$B poweroff -f
	while :; do $B sleep 1; done
}

$B mount -t proc proc /proc || fail "mount /proc"
$B mount -t sysfs sysfs /sys || fail "mount /sys"
$B mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

# Module parameters given on the kernel command line as `module.param=value` (what modprobe
# would pass; QEMU microvm describes its virtio-mmio devices as `virtio_mmio.device=...`).
read -r CMDLINE </proc/cmdline
while read -r m; do
	[ -n "$m" ] || continue
	name=${m%.ko}
	params=""
	for a in $CMDLINE; do
		case $a in "$name".*=*) params="$params ${a#"$name".}" ;; esac
	done
	# shellcheck disable=SC2086
	$B insmod "/lib/modules/$m" $params || echo "skiff-init: insmod $m failed" >/dev/console
done </lib/modules/order

# Uptime in centiseconds, without forking (slow under emulation).
uptime_cs() {
	read -r up _ </proc/uptime
	f=${up#*.}
	NOW=$((${up%.*} * 100 + ${f#0}))
}

# Polls `find_$1` every 5 ms for up to 3 s.
wait_for() {
	uptime_cs
	deadline=$((NOW + 300))
	while :; do
		"find_$1" && return 0
		uptime_cs
		[ "$NOW" -lt "$deadline" ] || return 1
		$B usleep 5000
	done
}

ROOT_DEV=""
CODE_DEV=""
find_disks() {
	for s in /sys/block/vd*/serial; do
		[ -r "$s" ] || continue
		d=${s%/serial}
		d=${d##*/}
		v=""
		read -r v <"$s"
		case $v in
		skiff-root) ROOT_DEV=/dev/$d ;;
		skiff-code) CODE_DEV=/dev/$d ;;
		esac
	done
	[ -n "$ROOT_DEV" ]
}
# virtio_blk probes every disk while it loads, so the code disk (optional) is there by the
# time the root disk is.
wait_for disks
[ -n "$ROOT_DEV" ] || fail "no virtio disk with serial skiff-root"
$B mount -t ext4 -o ro,noatime "$ROOT_DEV" /newroot || fail "mount root disk $ROOT_DEV"
if [ -n "$CODE_DEV" ]; then
	$B mount -t ext4 -o ro,noatime,nodev,nosuid "$CODE_DEV" /newroot/mnt/code ||
		fail "mount code disk $CODE_DEV"
fi

# A `persistent` function's workspace: the host's directory over virtiofs (writes go
# straight to the host, so nothing is lost when the VM is killed).
case " $CMDLINE " in
*" skiff.workspace=1 "*)
	$B mount -t virtiofs -o nodev,nosuid skiff-ws /newroot/mnt/workspace ||
		fail "mount the workspace (virtiofs skiff-ws)"
	;;
esac

CHANNEL=""
find_channel() {
	for n in /sys/class/virtio-ports/vport*/name; do
		[ -r "$n" ] || continue
		v=""
		read -r v <"$n"
		if [ "$v" = skiff ]; then
			d=${n%/name}
			CHANNEL=/dev/${d##*/}
			return 0
		fi
	done
	return 1
}
wait_for channel || fail "no virtio-serial port named skiff"

$B ifconfig lo 127.0.0.1 up || fail "ifconfig lo"
if [ -e /sys/class/net/eth0 ]; then
	$B ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up || fail "ifconfig eth0"
	$B route add default gw 10.0.2.2 || fail "default route"
	# 10.0.2.2 is QEMU user-net's alias for the host's loopback: never reachable from a guest.
	$B route add -host 10.0.2.2 reject || fail "reject route to 10.0.2.2"
fi

$B mount --move /dev /newroot/dev || fail "move /dev"
$B mount --move /proc /newroot/proc || fail "move /proc"
$B umount /sys || fail "umount /sys"
exec $B switch_root /newroot /opt/skiff/skiff __agent --vm-channel "$CHANNEL"
