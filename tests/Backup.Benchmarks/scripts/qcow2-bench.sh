#!/bin/bash
# qcow2 targets: sequential 1 MiB writes/reads on fresh 1 GiB images, random 4 KiB reads on 16 GiB allocated images,
# raw vs qcow2, backupd vs QSD, through the daemon's NBD export with qemu-img bench.
# Usage: [DIRECT=on] [SEQONLY=1] qcow2-bench.sh ROUNDS. Needs $BENCH_DIR/r16.raw and $BENCH_DIR/q16.qcow2:
#   qemu-img create -f raw -o preallocation=falloc r16.raw 16G; qemu-img create -f qcow2 -o preallocation=falloc q16.qcow2 16G
. "$(dirname "$0")/lib.sh"
S=/tmp/pq.sock; U="nbd+unix:///n?socket=$S"
R=${1:-3}
bench() { qemu-img bench -f raw -t none "$@" "$U" 2>&1 | sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p'; }
# 4 KiB × 524287 (odd, so coprime with the 2^22 blocks of 16 GiB): offsets wrap around the image and scatter over it
STEP=$((4096*524287))
for r in $(seq $R); do
  for kind in backupd qsd; do
    for fmt in raw qcow2; do
      rm -f $BENCH_DIR/fresh.img; qemu-img create -q -f $fmt $BENCH_DIR/fresh.img 1G; sync
      start_daemon $kind $fmt $BENCH_DIR/fresh.img $S ${DIRECT:-off} || exit 1
      w=$(bench -w -c 1024 -d 32 -s 1M)
      rd=$(bench -c 1024 -d 32 -s 1M)
      stop_daemon; sync
      if [ -n "${SEQONLY:-}" ]; then echo "$r $kind $fmt seqwrite_s=$w seqread_s=$rd"; continue; fi
      img=r16.raw; [ $fmt = qcow2 ] && img=q16.qcow2
      start_daemon $kind $fmt $BENCH_DIR/$img $S ${DIRECT:-off} || exit 1
      cold=$(bench -c 100000 -d 32 -s 4K -S $STEP)
      warm=$(bench -c 100000 -d 32 -s 4K -S $STEP)
      stop_daemon
      echo "$r $kind $fmt seqwrite_s=$w seqread_s=$rd rand4k_cold_s=$cold rand4k_warm_s=$warm"
    done
  done
done
