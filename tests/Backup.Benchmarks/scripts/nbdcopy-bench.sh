#!/bin/bash
# NBD export throughput targets: nbdcopy of a 4 GiB raw export to null: and of a 4 GiB file into a writable export.
# Usage: nbdcopy-bench.sh RUNS. Needs $BENCH_DIR/src4g.raw and $BENCH_DIR/exp4g.raw (4 GiB of random data:
# head -c 4G /dev/urandom > src4g.raw; cp src4g.raw exp4g.raw). Alternates backupd and QSD (and a second
# backupd build if OLD_DLL is set); prints wall seconds / daemon CPU ticks / daemon context switches.
set -u
. "$(dirname "$0")/lib.sh"
RUNS=${1:-5}
S=/tmp/pb.sock; U="nbd+unix:///n?socket=$S"
NEW=$BACKUPD_DLL
one() { local t0=$(cputicks $DPID) c0=$(ctxsw $DPID); local w=$(timeit "$@"); echo "$w/$(( $(cputicks $DPID)-t0 ))/$(( $(ctxsw $DPID)-c0 ))"; }
for r in $(seq $RUNS); do
  for label in ${OLD_DLL:+before} after qsd; do
    kind=backupd; [ $label = qsd ] && kind=qsd
    if [ $label = before ]; then BACKUPD_DLL=$OLD_DLL; else BACKUPD_DLL=$NEW; fi
    start_daemon $kind raw $BENCH_DIR/exp4g.raw $S || exit 1
    a=$(one nbdcopy "$U" null:)
    b=$(one nbdcopy --connections=1 "$U" null:)
    c=$(one nbdcopy $BENCH_DIR/src4g.raw "$U"); sync
    d=$(one nbdcopy --connections=1 $BENCH_DIR/src4g.raw "$U"); sync
    stop_daemon
    echo "$r $label null_default=$a null_c1=$b in_default=$c in_c1=$d"
  done
done
