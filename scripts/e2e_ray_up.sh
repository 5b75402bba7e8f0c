#!/usr/bin/env bash
# End-to-end check of the deployment on loopback (run by .ci/run; needs root):
#   an ssh server on 127.0.0.1 only, a node user of its own, a MongoDB-wire store;
#   `ray up -y` with a copy of cluster.yaml pointing at 127.0.0.1, serving the example
#   app examples/apps/helpdesk.py (OVERSTORY_APP=helpdesk:app); a driver on the cluster
#   (`ray submit`, `ray job submit`) and a client outside it (Ray Client) talk to the same
#   conversation with its agents by name; `overstory promote` moves it to version 2;
#   `overstory health` / `status`; token auth checked; `ray down`; the history is still
#   in the store. Everything it started is stopped on every path.
#
# The node is a dedicated user (overstory-e2e, created if missing and kept: its home
# caches the node virtualenv, so later runs skip the ~50 s Ray install). Its Ray runs
# under its own RAY_TMPDIR, and `ray stop` as that user can only stop that user's
# processes — never another Ray on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
NODE_USER=overstory-e2e
say() { printf '== e2e: %s\n' "$*"; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

[ "$(id -u)" -eq 0 ] || { echo "e2e_ray_up.sh: needs root (installs and runs sshd)" >&2; exit 2; }
if [ ! -x .venv/bin/ray ] || [ ! -x .venv/bin/secantusd-py ]; then
  EXTRAS=test source scripts/_venv.sh
fi
OPS_BIN="$REPO/.venv/bin"

# --- packages, only when missing ------------------------------------------------------
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync > /dev/null || missing+=(rsync)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d (as in Debian images) keeps the package from starting a system sshd.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi
if ss -Hltn 'sport = :22' | grep -q .; then
  echo "e2e_ray_up.sh: something already listens on port 22; Ray's local provider needs it" >&2
  exit 1
fi

RUN=$(mktemp -d /tmp/overstory-e2e.XXXXXX)
SSHD_PID="" MONGO_PID="" CLUSTER_UP=0 NODE_HOME=""
YAML="$RUN/cluster.yaml"

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  if [ "$CLUSTER_UP" = 1 ]; then
    say "cleanup: ray down"
    timeout 120 "$OPS_BIN/ray" down -y "$YAML" > "$RUN/ray-down-cleanup.log" 2>&1
  fi
  # Anything the node user still runs was started by this script (its Ray): stop by pid.
  if id "$NODE_USER" > /dev/null 2>&1; then
    pids=$(pgrep -u "$NODE_USER")
    if [ -n "$pids" ]; then
      say "cleanup: stopping leftover node processes: $(echo $pids)"
      kill $pids 2> /dev/null; sleep 2; kill -9 $(pgrep -u "$NODE_USER") 2> /dev/null
    fi
    rm -f "$NODE_HOME/.ssh/authorized_keys"
  fi
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2> /dev/null && wait "$SSHD_PID" 2> /dev/null
  [ -n "$MONGO_PID" ] && kill "$MONGO_PID" 2> /dev/null && wait "$MONGO_PID" 2> /dev/null
  if [ "$status" -ne 0 ]; then
    say "FAILED (exit $status); the last line of each log, then the logs:"
    for log in "$RUN"/*.log; do
      printf '  %s: %s\n' "$(basename "$log")" "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-300)"
    done
    tail -n 25 "$RUN"/*.log 2> /dev/null
    # the head's Ray Client server (proxy) and its per-client servers
    [ -n "$NODE_HOME" ] && tail -n 15 "$NODE_HOME"/raytmp/ray/session_latest/logs/ray_client_server*.err 2> /dev/null
  fi
  rm -rf "$RUN" "$REPO/dist"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port below the kernel's ephemeral range (32768+, where outgoing connections and
# Ray's own randomly bound ports land) and above Ray's worker ports (10002-19999) and
# Ray Client's per-client servers (23000-23999), so nothing else can take it meanwhile.
free_port() {
  python3 - <<'PY'
import random, socket
for port in random.sample(range(24000, 32000), 200):
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
        print(port)
        break
else:
    raise SystemExit("no free port in 24000-31999")
PY
}

# --- the node: a user of its own, reachable over ssh on 127.0.0.1 only -----------------
if ! id "$NODE_USER" > /dev/null 2>&1; then
  useradd --create-home --shell /bin/bash --password '*' "$NODE_USER"
fi
NODE_HOME=$(getent passwd "$NODE_USER" | cut -d: -f6)
ssh-keygen -q -t ed25519 -N '' -C overstory-e2e -f "$RUN/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -C overstory-e2e-host -f "$RUN/host_key"
install -d -m 700 -o "$NODE_USER" -g "$NODE_USER" "$NODE_HOME/.ssh"
install -m 600 -o "$NODE_USER" -g "$NODE_USER" "$RUN/id_ed25519.pub" "$NODE_HOME/.ssh/authorized_keys"
cat > "$RUN/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $RUN/host_key
PidFile $RUN/sshd.pid
AllowUsers $NODE_USER
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
Subsystem sftp internal-sftp
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$RUN/sshd_config" 2> "$RUN/sshd.log" &
SSHD_PID=$!
say "sshd on 127.0.0.1:22 (pid $SSHD_PID), node user $NODE_USER"

# --- the store: a MongoDB wire-protocol server on loopback (test dependency) -----------
MONGO_PORT=$(free_port)
"$OPS_BIN/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$RUN/mongo" \
  --log-level WARNING > "$RUN/mongo.log" 2>&1 &
MONGO_PID=$!
export OVERSTORY_STORE="mongodb://127.0.0.1:$MONGO_PORT/e2e?serverSelectionTimeoutMS=30000"
"$OPS_BIN/python" -c 'import sys; from pymongo import MongoClient; MongoClient(sys.argv[1], serverSelectionTimeoutMS=30000).admin.command("ping")' \
  "$OVERSTORY_STORE"
say "store $OVERSTORY_STORE (pid $MONGO_PID)"

# --- what the operator runs: deploy/prepare, then `ray up` on an edited cluster.yaml ---
# The node's Ray lives under its own temp dir (never another Ray's /tmp/ray).
export OVERSTORY_APP=helpdesk:app # the example app: what the head's `overstory serve` deploys
OVERSTORY_CLUSTER_ENV="$RUN/cluster.env" RAY_TMPDIR="$NODE_HOME/raytmp" \
  OVERSTORY_EXTRA_ENV=RAY_TMPDIR OVERSTORY_VENV_BIN="$OPS_BIN" deploy/prepare
GCS_PORT=$(free_port) CLIENT_PORT=$(free_port) DASH_PORT=$(free_port) HTTP_PORT=$(free_port)
"$OPS_BIN/python" - "$REPO/cluster.yaml" "$YAML" <<EOF
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
# the fields an operator edits
config["cluster_name"] = "overstory-e2e"
config["provider"]["head_ip"] = "127.0.0.1"
config["provider"]["worker_ips"] = []
config["auth"] = {"ssh_user": "$NODE_USER", "ssh_private_key": "$RUN/id_ed25519"}
# absolute local paths (ray up runs from the repository root; this copy lives in $RUN)
mounts = config["file_mounts"]
mounts["~/overstory/dist"] = "$REPO/dist"
mounts["~/overstory/app"] = "$REPO/examples/apps"
mounts["~/overstory/profile.sh"] = "$REPO/deploy/node-profile.sh"
mounts["~/overstory/cluster.env"] = "$RUN/cluster.env"
# free ports, so another Ray on this machine cannot collide with the node's
ports = {"6379": "$GCS_PORT", "10001": "$CLIENT_PORT", "8265": "$DASH_PORT", "8000": "$HTTP_PORT"}
for key in ("head_start_ray_commands", "worker_start_ray_commands"):
    commands = []
    for command in config[key]:
        for old, new in ports.items():
            command = command.replace(f"={old}", f"={new}").replace(f":{old}", f":{new}")
        commands.append(command)
    config[key] = commands
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
EOF

say "ray up"
t0=$(now)
CLUSTER_UP=1
"$OPS_BIN/ray" up -y --no-config-cache "$YAML" > "$RUN/ray-up.log" 2>&1
RAY_UP_S=$(secs "$t0" "$(now)")
say "ray up: ${RAY_UP_S} s"

# --- a driver on the cluster: `ray submit` runs it on the head in a login shell --------
# (ssh -tt merges the remote output into stdout, with CRLF line ends)
"$OPS_BIN/ray" submit "$YAML" scripts/e2e_driver.py alice hello from the head > "$RUN/submit.log" 2>&1
out=$(tr -d '\r' < "$RUN/submit.log" | grep '^{' | tail -n 1)
say "driver on the head: $out"
echo "$out" | "$OPS_BIN/python" -c '
import json, sys
r = json.load(sys.stdin)
assert r["reply"] == "echo #1: hello from the head", r
assert (r["agent"], r["version"]) == ("support", "1"), r  # the app'"'"'s first agent
assert r["served"] == ["billing", "support"], r
assert not r["client_mode"], r'

# --- the Ray Jobs API through the dashboard (token in the Authorization header) -------
export RAY_AUTH_MODE=token # the operator's client side; the token is ~/.ray/auth_token
"$OPS_BIN/ray" job submit --address "http://127.0.0.1:$DASH_PORT" --working-dir scripts \
  -- python e2e_driver.py alice "hello from a job" > "$RUN/job.log" 2>&1
out=$(tr -d '\r' < "$RUN/job.log" | grep '^{' | tail -n 1)
say "ray job submit: $out"
echo "$out" | "$OPS_BIN/python" -c 'import json,sys; r=json.load(sys.stdin); assert r["reply"] == "echo #2: hello from a job", r'

# --- a client outside the cluster: Ray Client with the token --------------------------
out=$("$OPS_BIN/python" scripts/e2e_driver.py alice "hello through Ray Client" \
  --address "ray://127.0.0.1:$CLIENT_PORT" 2> "$RUN/client.log" | tail -n 1)
say "Ray Client: $out"
echo "$out" | "$OPS_BIN/python" -c '
import json, sys
r = json.load(sys.stdin)
assert r["client_mode"], r
assert r["reply"] == "echo #3: hello through Ray Client", r
assert r["user_messages"] == ["hello from the head", "hello from a job", "hello through Ray Client"], r'

# --- the other agent, by name: its tool is the deployed code ---------------------------
out=$("$OPS_BIN/python" scripts/e2e_driver.py alice "a refund of 20 EUR please" --agent billing \
  --address "ray://127.0.0.1:$CLIENT_PORT" 2>> "$RUN/client.log" | tail -n 1)
say "billing agent: $out"
echo "$out" | "$OPS_BIN/python" -c '
import json, sys
r = json.load(sys.stdin)
assert (r["agent"], r["version"]) == ("billing", "1"), r
assert r["reply"] == "refund_estimate returned 19.60 EUR", r
assert r["user_messages"] == ["a refund of 20 EUR please"], r  # its own history'

# --- blue-green: promote support to version 2; alice's next turn runs on it -----------
"$OPS_BIN/ray" exec "$YAML" "overstory promote support 2 --json" > "$RUN/promote.log" 2>&1
say "promote: $(tr -d '\r' < "$RUN/promote.log" | grep '^{' | tail -n 1)"
out=$("$OPS_BIN/python" scripts/e2e_driver.py alice "hello after the promote" \
  --address "ray://127.0.0.1:$CLIENT_PORT" 2>> "$RUN/client.log" | tail -n 1)
say "after promote: $out"
echo "$out" | "$OPS_BIN/python" -c '
import json, sys
r = json.load(sys.stdin)
assert (r["agent"], r["version"]) == ("support", "2"), r
assert r["reply"] == "echo #4: hello after the promote", r'

# --- token auth is on: no token, no entry ---------------------------------------------
code=$("$OPS_BIN/python" -c 'import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=10); print(200)
except urllib.error.HTTPError as e:
    print(e.code)' "http://127.0.0.1:$DASH_PORT/api/version")
say "dashboard without a token: HTTP $code"
[ "$code" = 401 ] || [ "$code" = 403 ]
t0=$(now)
if RAY_AUTH_TOKEN=not-the-token timeout 120 "$OPS_BIN/overstory" health \
  --address "ray://127.0.0.1:$CLIENT_PORT" > "$RUN/health-bad-token.log" 2>&1; then
  echo "overstory health succeeded with a wrong token" >&2
  exit 1
fi
say "overstory health with a wrong token: refused after $(secs "$t0" "$(now)") s ($(tail -n 1 "$RUN/health-bad-token.log" | cut -c1-200))"
grep -q "did not accept this client's token" "$RUN/health-bad-token.log" \
  || { echo "a wrong token was not reported as refused" >&2; exit 1; }
grep -q not-the-token "$RUN/health-bad-token.log" && { echo "the token leaked into the output" >&2; exit 1; }

# --- overstory health / status, from outside and on the head --------------------------
"$OPS_BIN/overstory" health --address "ray://127.0.0.1:$CLIENT_PORT"
"$OPS_BIN/overstory" status --address "ray://127.0.0.1:$CLIENT_PORT"
"$OPS_BIN/ray" exec "$YAML" "overstory health && overstory serve" 2> "$RUN/exec.log" | tail -n 2

# --- the HTTP front door the head's start command deployed, through the openai SDK -------
DOOR_KEY=$("$OPS_BIN/overstory" keys create --user alice --json \
  | "$OPS_BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["key"])')
"$OPS_BIN/python" - "$HTTP_PORT" "$DOOR_KEY" <<'EOF'
import sys, time, urllib.request

import openai

port, key = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
deadline, last = time.monotonic() + 120, None
while True:
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=15) as answer:
            if answer.status == 200:
                break
    except OSError as exc:
        last = exc
    if time.monotonic() > deadline:
        raise SystemExit(f"the front door is not ready: {last}")
    time.sleep(1)
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
conv = client.conversations.create()
answer = client.responses.create(model="support", conversation=conv.id, input="hello over HTTP")
assert answer.status == "completed", answer
assert answer.output_text, answer
streamed = client.responses.create(
    model="support", conversation=conv.id, input="and streamed", stream=True
)
kinds = [event.type for event in streamed]
assert kinds[-1] == "response.completed", kinds
stranger = openai.OpenAI(base_url=base + "/v1", api_key="ovs_000000000000_" + "A" * 43, max_retries=0)
try:
    stranger.conversations.retrieve(conv.id)
    raise SystemExit("a made-up key was let in")
except openai.AuthenticationError:
    pass
print(f"== e2e: the front door answered over HTTP ({answer.output_text!r}) and streamed")
EOF

# --- ray down: the cluster stops, the history stays -----------------------------------
say "ray down"
t0=$(now)
"$OPS_BIN/ray" down -y "$YAML" > "$RUN/ray-down.log" 2>&1
CLUSTER_UP=0
RAY_DOWN_S=$(secs "$t0" "$(now)")
say "ray down: ${RAY_DOWN_S} s"
# (ssh's ControlPersist keeps an idle session process of the node user for 10 s: not Ray)
left=$(pgrep -a -u "$NODE_USER" | grep -v 'sshd: ' || true)
[ -z "$left" ] || { echo "processes left on the node after ray down: $left" >&2; exit 1; }
say "no Ray process of the node left after ray down"
"$OPS_BIN/python" - <<'EOF'
import asyncio, os
from overstory.store import open_store

async def main() -> None:
    store = open_store(os.environ["OVERSTORY_STORE"])
    await store.open()
    try:
        messages = await store.load("support:alice")
    finally:
        await store.close()
    assert [m.content for m in messages if m.kind == "user"] == [
        "hello from the head", "hello from a job", "hello through Ray Client",
        "hello after the promote",
    ], messages
    print(f"== e2e: after ray down the store still holds alice's {len(messages)} messages")

asyncio.run(main())
EOF
say "PASS (ray up ${RAY_UP_S} s, ray down ${RAY_DOWN_S} s)"
