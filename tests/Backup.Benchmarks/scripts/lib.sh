# Helpers for the daemon-level benchmarks (docs/performance.md). Source it; BENCH_DIR holds the images.
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
mkdir -p "$BENCH_DIR"
BACKUPD_DLL=${BACKUPD_DLL:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/src/Backup.Daemon/bin/Release/net10.0/backupd.dll}
# start_daemon backupd|qsd raw|qcow2 IMAGE SOCKET [cache.direct on|off]: file + format node 'n', writable NBD export 'n'
start_daemon() {
  local kind=$1 fmt=$2 img=$3 sock=$4 direct=${5:-off}
  rm -f "$sock"
  local args=(--blockdev driver=file,node-name=f,filename=$img,cache.direct=$direct
              --blockdev driver=$fmt,node-name=n,file=f
              --nbd-server addr.type=unix,addr.path=$sock
              --export type=nbd,id=e,node-name=n,name=n,writable=on)
  if [ "$kind" = backupd ]; then
    dotnet "$BACKUPD_DLL" "${args[@]}" >/tmp/perf-$kind.log 2>&1 &
  else
    qemu-storage-daemon "${args[@]}" >/tmp/perf-$kind.log 2>&1 &
  fi
  DPID=$!
  for i in $(seq 200); do [ -S "$sock" ] && nbdinfo --size "nbd+unix:///n?socket=$sock" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "daemon $kind did not start" >&2; cat /tmp/perf-$kind.log >&2; return 1
}
stop_daemon() { kill "$DPID"; wait "$DPID" 2>/dev/null; }
# wall seconds of a command
timeit() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1 || echo "FAILED: $*" >&2; local e=$(date +%s.%N); echo "$e - $s" | bc; }
# CPU time of a process in clock ticks (1/100 s), and its context switches (all threads, voluntary + involuntary)
cputicks() { awk '{print $14+$15}' /proc/$1/stat; }
ctxsw() { cat /proc/$1/task/*/status 2>/dev/null | awk '/voluntary_ctxt_switches/{s+=$2} END{print s}'; }
