#!/bin/bash
# The qcow2 targets through NBD, three daemons alternating per round: backupd built from an older commit
# ($BEFORE_DLL), this tree's Release backupd, and qemu-storage-daemon. Same workloads as qcow2-bench.sh.
# Usage: BEFORE_DLL=/path/to/old/backupd.dll qcow2-ab-bench.sh ROUNDS on|off SEQONLY(0|1)
# (the old tree: git archive COMMIT | tar -x -C DIR; dotnet build -c Release DIR/src/Backup.Daemon).
. "$(dirname "$0")/lib.sh"
S=/tmp/pq2.sock; U="nbd+unix:///n?socket=$S"
R=${1:-3}; DIRECT=${2:-off}; SEQONLY=${3:-0}
AFTER_DLL=$BACKUPD_DLL
bench() { qemu-img bench -f raw -t none "$@" "$U" 2>&1 | sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p'; }
STEP=$((4096*524287))
for r in $(seq $R); do
  for kind in before after qsd; do
    case $kind in before) BACKUPD_DLL=$BEFORE_DLL; k=backupd;; after) BACKUPD_DLL=$AFTER_DLL; k=backupd;; qsd) k=qsd;; esac
    for fmt in raw qcow2; do
      rm -f $BENCH_DIR/fresh.img; qemu-img create -q -f $fmt $BENCH_DIR/fresh.img 1G; sync
      start_daemon $k $fmt $BENCH_DIR/fresh.img $S $DIRECT || exit 1
      w=$(bench -w -c 1024 -d 32 -s 1M)
      rd=$(bench -c 1024 -d 32 -s 1M)
      stop_daemon; sync
      if [ "$SEQONLY" = 1 ]; then echo "$r $kind $fmt seqwrite_s=$w seqread_s=$rd"; continue; fi
      img=r16.raw; [ $fmt = qcow2 ] && img=q16.qcow2
      start_daemon $k $fmt $BENCH_DIR/$img $S $DIRECT || exit 1
      cold=$(bench -c 100000 -d 32 -s 4K -S $STEP)
      warm=$(bench -c 100000 -d 32 -s 4K -S $STEP)
      stop_daemon
      echo "$r $kind $fmt seqwrite_s=$w seqread_s=$rd rand4k_cold_s=$cold rand4k_warm_s=$warm"
    done
  done
done
rm -f $BENCH_DIR/fresh.img
