#!/usr/bin/env bash
# Builds the release binary, writes one bench config per ledger (memory, embedded, redis; no
# rate limits, presence auth, log level warn) and runs the shared loopback harness with them as
# extra targets next to nginx and haproxy. Extra arguments and the harness's environment
# (PROFILE, MODES, WORKLOADS, DURATION, PEERS) pass through, e.g.
#   scripts/bench.sh                      # PROFILE=quick by default
#   PROFILE=full scripts/bench.sh
#   TARGETS="mem emb" scripts/bench.sh    # a subset of the ledgers
#   ONCE_PEER=0 scripts/bench.sh          # without the haproxy download-once peer
#   REDIS_CPU=0 scripts/bench.sh          # redis-server pinned to CPU 0 (default: unpinned,
#                                         # wherever the scheduler puts it)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/bench-config.sh"
harness=${BENCH_HARNESS:-$root/../shared/bench/run.sh}
[[ -f $harness ]] || { echo "bench.sh: no harness at $harness (set BENCH_HARNESS)" >&2; exit 2; }
work=${BENCH_WORK:-/tmp/oncegate-bench}
targets=${TARGETS:-mem emb redis}
export PROFILE=${PROFILE:-quick}

cargo build --release --locked --manifest-path "$root/Cargo.toml"
mkdir -p "$work"
cp "$root/target/release/oncegate" "$work/oncegate"

redis_port=18379
args=()
port=18083
for target in $targets; do
  case $target in
    mem) store='kind = "memory"' ;;
    emb) rm -f "$work/emb.redb" "$work"/emb.redb.journal.*; store="kind = \"embedded\"
path = \"$work/emb.redb\"" ;;
    redis)
      command -v redis-server >/dev/null || { echo "bench.sh: redis-server not found; skipping the redis target" >&2; continue; }
      redis-cli -p $redis_port shutdown nosave >/dev/null 2>&1 || true
      pin=()
      [[ -n ${REDIS_CPU:-} ]] && pin=(taskset -c "$REDIS_CPU")
      "${pin[@]}" redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
      store="kind = \"redis\"
url = \"redis://127.0.0.1:$redis_port\"
key_prefix = \"bench$(date +%s):\"" ;;
    *) echo "bench.sh: unknown target $target (mem emb redis)" >&2; exit 2 ;;
  esac
  bench_config "$work/$target.toml" "$port" "$store"
  args+=("og_$target=http://127.0.0.1:$port"
         --start "og_$target=env TOKIO_WORKER_THREADS=\$BENCH_THREADS $work/oncegate run --config $work/$target.toml")
  port=$((port + 2))
done

# The harness's crude download-once peer (haproxy with a stick table), for the refusal path.
if [[ ${ONCE_PEER:-1} == 1 ]]; then
  args+=(hx_once=http://127.0.0.1:18086
         --start "hx_once=haproxy -db -f $(dirname "$harness")/conf/haproxy-once.cfg")
fi

status=0
bash "$harness" "${args[@]}" "$@" || status=$?
[[ -f $work/redis.pid ]] && redis-cli -p $redis_port shutdown nosave >/dev/null 2>&1 || true
exit $status
