# Sourced by scripts/bench.sh and scripts/profile.sh: the proxy config every benchmark uses.
# bench_config <file> <port> <store section body>: presence auth, no rate limits, log level warn,
# the harness's upstream, the admin listener 1000 ports up.
bench_config() {
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:$2"
[upstream]
url = "http://127.0.0.1:18080"
[auth]
mode = "presence"
[store]
$3
[log]
level = "warn"
[admin]
listen = "127.0.0.1:$(($2 + 1000))"
TOML
}
