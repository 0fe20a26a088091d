#!/usr/bin/env bash
# Per-request cost of the proxy on the pinned loopback setup (docs/BENCHMARKS.md, "Where the CPU
# goes"). Needs the harness's servers (upstream on :18080, nginx :18081, haproxy :18082):
#   bash ../shared/bench/servers.sh start pinned
#
#   scripts/profile.sh instructions <unique|repeat> [memory|embedded|redis://host:port]
#       user-space instructions per request of target/release/oncegate (memory ledger, the
#       embedded ledger on a fresh file, or the Redis ledger on a redis-server already running
#       there) under valgrind's callgrind, counted over a 5 s wrk run after a 2 s warm-up;
#       deterministic to about 0.1 %, unlike times on this VM. callgrind emulates no SHA
#       extensions, so each SHA-256 digest costs ~3.4k instructions here against ~100 ns
#       natively. CALLGRIND_OUT=<file> keeps the profile. The embedded ledger is counted thread
#       by thread, including the 6 s after the run in which its threads finish the run's records.
#   scripts/profile.sh cpu <pid> <port> <unique|repeat>
#       user and kernel µs per request of any running proxy process (from /proc/<pid>/stat)
#       over a 6 s wrk run, wrk on CPU 0.
#   scripts/profile.sh threads <pid> <port> <unique|repeat>
#       the same run, per thread: CPU µs and voluntary / involuntary context switches per request
#       (from /proc/<pid>/task/*), e.g. the embedded ledger's request, journal and file threads.
#   scripts/profile.sh floor <unique|repeat|redis> [rounds]
#       the floor under oncegate (examples/floor.rs: its listener and upstream pool, no layers)
#       next to a peer (nginx forwarding for unique, the haproxy download-once peer for repeat)
#       and oncegate with the memory ledger, taking turns, each pinned to CPU 1: req/s and CPU µs
#       per request, 6 s each. `redis`: the floor with the memory and with the Redis ledger's
#       claim and commit, then oncegate with each (a private redis-server on port 18379).
#       Builds both release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-config.sh
harness=${BENCH_HARNESS_DIR:-$(cd .. && pwd)/shared/bench}
lua=$harness/lua/bench.lua
token=bench-token

# Prints the archive URL for the workload on the given port (a served one for "repeat").
archive_url() {
  local port=$1 kind=$2
  local url=http://127.0.0.1:$port/v2/p/instances/i/assets/archives/
  if [[ $kind == repeat ]]; then
    url=${url}served-$RANDOM$RANDOM
    curl -s -o /dev/null -H "X-Auth-Token: $token" "$url"
  fi
  echo "$url"
}

# wrk's request count: load <seconds> <url> <kind>.
load() {
  local seconds=$1 url=$2 kind=$3 mode=unique
  [[ $kind == repeat ]] && mode=fixed
  taskset -c 0 wrk -t1 -c64 -d"${seconds}s" -H "X-Auth-Token: $token" -s "$lua" "$url" \
    -- "p$RANDOM" "$mode" | grep -o 'requests=[0-9]*' | cut -d= -f2
}

case ${1:-} in
  instructions)
    kind=${2:?unique or repeat} ledger=${3:-memory}
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
    port=18099
    store='kind = "memory"' per_thread=()
    case $ledger in
      redis://*) store="kind = \"redis\"
url = \"$ledger\"" ;;
      embedded)
        store="kind = \"embedded\"
path = \"$dir/ledger.redb\""
        per_thread=(--separate-threads=yes) ;;
    esac
    bench_config "$dir/oncegate.toml" "$port" "$store"
    TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
      "${per_thread[@]}" target/release/oncegate run --config "$dir/oncegate.toml" 2>/dev/null &
    pid=$!
    for _ in $(seq 100); do
      curl -s -o /dev/null "http://127.0.0.1:$port/" && break
      sleep 0.3
    done
    url=$(archive_url "$port" "$kind")
    load 2 "$url" "$kind" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    requests=$(load 5 "$url" "$kind")
    # The file thread moves records into the file up to 5 s after they come (APPLY_WAIT).
    [[ $ledger == embedded ]] && sleep 6
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    if [[ $ledger == embedded ]]; then
      echo "$kind (embedded): $requests requests; instructions per request, by thread:"
      # One dump per thread (cg.out.1-NN), named here by a function only that thread runs.
      for dump in "$dir"/cg.out.1-*; do
        instructions=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
        ((instructions / requests > 0)) || continue
        name=other
        if grep -q 'hyper::proto' "$dump"; then name=request
        elif grep -q 'Journal::push' "$dump"; then name=ledger-journal
        elif grep -q 'WriteTransaction::commit' "$dump"; then name=ledger-file
        elif grep -q 'digest_filter' "$dump"; then name=ledger-digests
        fi
        printf '  %-15s %7d\n' "$name" $((instructions / requests))
      done
      exit 0
    fi
    dump=$(ls -t "$dir"/cg.out.* | head -1)
    instructions=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
    [[ -n ${CALLGRIND_OUT:-} ]] && cp "$dump" "$CALLGRIND_OUT"
    echo "$kind ($ledger): $requests requests, $((instructions / requests)) instructions per request"
    ;;
  cpu)
    pid=${2:?pid} port=${3:?port} kind=${4:?unique or repeat}
    url=$(archive_url "$port" "$kind")
    read -r user0 sys0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    requests=$(load 6 "$url" "$kind")
    read -r user1 sys1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    ticks=$(getconf CLK_TCK)
    awk -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v n="$requests" -v t="$ticks" \
      -v kind="$kind" 'BEGIN {
        printf "%s: %d req/s, user %.1f µs, kernel %.1f µs per request\n",
          kind, n / 6, u * 1e6 / t / n, s * 1e6 / t / n }'
    ;;
  threads)
    pid=${2:?pid} port=${3:?port} kind=${4:?unique or repeat}
    url=$(archive_url "$port" "$kind")
    # One line per thread: tid, name, CPU ticks, voluntary and involuntary switches.
    snapshot() {
      for task in /proc/"$pid"/task/*; do
        echo "${task##*/} $(tr -c '[:alnum:]\n-' _ <"$task/comm") \
          $(awk '{print $14 + $15}' "$task/stat") \
          $(awk '/^(non)?voluntary_ctxt_switches/ {printf "%s ", $2}' "$task/status")"
      done | LC_ALL=C sort
    }
    before=$(snapshot)
    requests=$(load 6 "$url" "$kind")
    after=$(snapshot)
    echo "$kind: $((requests / 6)) req/s; per request:"
    # Joined by tid: $2-$5 before, $6-$9 after.
    LC_ALL=C join <(echo "$before") <(echo "$after") |
      awk -v n="$requests" -v t="$(getconf CLK_TCK)" '$7 > $3 {
        printf "  %-18s %6.1f µs CPU, %.3f voluntary, %.3f involuntary switches\n",
          $2, ($7 - $3) * 1e6 / t / n, ($8 - $4) / n, ($9 - $5) / n }'
    ;;
  floor)
    kind=${2:?unique, repeat or redis} rounds=${3:-3}
    cargo build --release --locked --bin oncegate --example floor
    dir=$(mktemp -d)
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
    bench_config "$dir/oncegate.toml" 18099 'kind = "memory"'
    # The running process's pid once its port answers.
    start() {
      local port=$1
      shift
      taskset -c 1 "$@" >/dev/null 2>&1 &
      pid=$!
      for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && return
        sleep 0.1
      done
    }
    # One row: name, req/s, CPU µs per request of process <pid> serving port <port>.
    row() {
      local name=$1 pid=$2 port=$3 url
      url=$(archive_url "$port" "$kind")
      load 1 "$url" "$kind" >/dev/null
      local ticks0 ticks1 requests
      ticks0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
      requests=$(load 6 "$url" "$kind")
      ticks1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
      awk -v name="$name" -v n="$requests" -v t=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "  %-12s %7d req/s %6.2f µs CPU per request\n", name, n / 6, t * 1e6 / hz / n }'
    }
    stop() {
      kill "$pid"
      wait "$pid" 2>/dev/null || true
    }
    nginx_worker=$(pgrep -f 'nginx: worker' | while read -r p; do
      grep -q proxy-nginx "/proc/$(awk '{print $4}' "/proc/$p/stat")/cmdline" && echo "$p"
    done | head -1)
    floor_forward=(target/release/examples/floor forward 127.0.0.1:18098 http://127.0.0.1:18080)
    if [[ $kind == redis ]]; then
      # A private redis-server, as scripts/bench.sh starts it (unpinned).
      redis_url=redis://127.0.0.1:18379
      trap 'kill $(jobs -p) 2>/dev/null || true; redis-cli -p 18379 shutdown nosave >/dev/null 2>&1; rm -rf "$dir"' EXIT
      redis-cli -p 18379 shutdown nosave >/dev/null 2>&1 || true
      redis-server --port 18379 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
      until redis-cli -p 18379 ping >/dev/null 2>&1; do sleep 0.1; done
      bench_config "$dir/redis.toml" 18099 "kind = \"redis\"
url = \"$redis_url\""
    fi
    for round in $(seq "$rounds"); do
      echo "round $round ($kind):"
      case $kind in
        repeat)
          BENCH_THREADS=1 start 18086 haproxy -db -f "$harness/conf/haproxy-once.cfg"
          row hx_once "$pid" 18086
          stop
          start 18098 target/release/examples/floor refuse 127.0.0.1:18098
          row floor "$pid" 18098
          stop
          ;;
        redis)
          for ledger in memory "$redis_url"; do
            start 18098 "${floor_forward[@]}" "$ledger"
            row "floor_${ledger%%:*}" "$pid" 18098
            stop
          done
          ;;
        *)
          row nginx "$nginx_worker" 18081
          start 18098 "${floor_forward[@]}"
          row floor "$pid" 18098
          stop
          ;;
      esac
      TOKIO_WORKER_THREADS=1 start 18099 target/release/oncegate run --config "$dir/oncegate.toml"
      row oncegate "$pid" 18099
      stop
      if [[ $kind == redis ]]; then
        TOKIO_WORKER_THREADS=1 start 18099 target/release/oncegate run --config "$dir/redis.toml"
        row og_redis "$pid" 18099
        stop
      fi
    done
    ;;
  *)
    sed -n '2,23p' "$0"
    exit 2
    ;;
esac
