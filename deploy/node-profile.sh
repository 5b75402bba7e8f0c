# overstory node environment (shipped to ~/overstory/profile.sh by cluster.yaml).
# Sourced by the start commands before `ray start`, so every Ray worker process and
# every actor inherits it, and by ~/.bashrc, so `ray exec`/`ray down` see it too.
# cluster.env holds OVERSTORY_STORE and the provider keys, from the operator's env.
if [ -f "$HOME/overstory/cluster.env" ]; then
  set -a
  . "$HOME/overstory/cluster.env"
  set +a
fi
export RAY_AUTH_MODE=token
# The operator's app (cluster.yaml mounts its directory here): every Ray worker, hence
# every host, imports $OVERSTORY_APP from it.
if [ -d "$HOME/overstory/app" ]; then
  case ":${PYTHONPATH:-}:" in
    *":$HOME/overstory/app:"*) ;;
    *) export PYTHONPATH="$HOME/overstory/app${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
fi
# gRPC's fork handlers crash the child that Ray Client's proxy forks for each new client
# (SIGSEGV before exec, seen under CPU load: "Starting Ray client server failed"); Ray's
# processes fork only to exec, so they need none.
export GRPC_ENABLE_FORK_SUPPORT=0
case ":$PATH:" in
  *":$HOME/overstory/venv/bin:"*) ;;
  *) export PATH="$HOME/overstory/venv/bin:$PATH" ;;
esac
# The door's ingress (docs/guides/http.md "The ingress"): Ray Serve's high-throughput mode,
# HAProxy (the binary ray[serve] bundles) in front of replicas that serve HTTP themselves,
# as a Ray started by overstory has it; OVERSTORY_SERVE_INGRESS=proxy keeps Serve's
# Python proxy.
if [ "${OVERSTORY_SERVE_INGRESS:-auto}" != proxy ]; then
  export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
  export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
  # HAProxy's files in a directory of this user's: Serve's default, /tmp/haproxy-serve,
  # belongs to whichever user of the machine made it first.
  haproxy_dir="${TMPDIR:-/tmp}/overstory-haproxy-$(id -u)"
  export RAY_SERVE_HAPROXY_CONFIG_FILE_LOC="${RAY_SERVE_HAPROXY_CONFIG_FILE_LOC:-$haproxy_dir/haproxy.cfg}"
  export RAY_SERVE_HAPROXY_SOCKET_PATH="${RAY_SERVE_HAPROXY_SOCKET_PATH:-$haproxy_dir/admin.sock}"
  export RAY_SERVE_HAPROXY_SERVER_STATE_BASE="${RAY_SERVE_HAPROXY_SERVER_STATE_BASE:-$haproxy_dir}"
  export RAY_SERVE_HAPROXY_SERVER_STATE_FILE="${RAY_SERVE_HAPROXY_SERVER_STATE_FILE:-$haproxy_dir/server-state}"
  export RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH="${RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH:-$haproxy_dir/metrics.sock}"
fi
