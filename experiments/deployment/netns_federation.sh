#!/usr/bin/env bash
# The multi-machine Flower deployment of docs/deployment.md on one machine: a
# coordinator and three hospitals, each in its own Linux network namespace, joined
# by a bridge in a fourth ("switch") namespace. Every role runs the documented
# commands of phems_clinical.federation.flower.deploy in its own namespace.
#
#   netns_federation.sh --check          exit 0 if namespaces can be made here,
#                                        77 (with the reason) if not
#   netns_federation.sh WORK [ROUNDS]    run it; WORK must be new or empty
#
# Network (10.77.0.0/24): coordinator 10.77.0.1 (SuperLink on port 9092, its
# certificate's SAN is that IP); hospital k at 10.77.0.1k. The hospitals' bridge
# ports are isolated (a hospital reaches the coordinator, never another hospital),
# and when nft is installed each namespace gets the firewall of the docs: a
# hospital opens connections to 10.77.0.1:9092 only and accepts none; the
# coordinator accepts only the hospitals' connections to 9092.
#
# WORK receives: coordinator/ (CA, SuperLink, runs/fit/result.json and the
# checkpoint), hospital_k/site/ (cohort.csv, site_policy.yaml, audit log),
# hospital_k/deploy/ (its keys), data_user/ (key, signed request), logs/, and
# reachability.json (probes before and after the isolation was applied).
# Everything (processes, namespaces) is torn down on exit, also on an error.
#
# Environment: PYTHON (default python3), PHEMS_NETNS_TAG (prefix of the
# namespace names, default pd<pid>), N_PATIENTS (default 24), SEED (run seed,
# default 5), DATA_SEED (simulation, default 11).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
TAG=${PHEMS_NETNS_TAG:-pd$$}
NS_SW="$TAG-sw"
NS_C="$TAG-coord"
K=3
NS_H=()
for k in $(seq 0 $((K - 1))); do NS_H+=("$TAG-h$k"); done
COORD_IP=10.77.0.1
PORT=9092
hip() { echo "10.77.0.1$1"; }

check() {
    if [ "$(id -u)" != 0 ]; then
        echo "network namespaces need root (ip netns add); running as uid $(id -u)" >&2
        return 77
    fi
    if ! command -v ip >/dev/null || ! command -v bridge >/dev/null; then
        echo "iproute2 (ip, bridge) is not installed" >&2
        return 77
    fi
    local probe="$TAG-probe" err
    if ! err=$(ip netns add "$probe" 2>&1); then
        echo "ip netns add is not permitted here: $err" >&2
        return 77
    fi
    if ! err=$(ip -n "$probe" link add x0 type veth peer name x1 2>&1); then
        ip netns del "$probe"
        echo "veth pairs cannot be made in a namespace here: $err" >&2
        return 77
    fi
    ip netns del "$probe"
    return 0
}

if [ "${1:-}" = "--check" ]; then
    check
    exit $?
fi
if [ $# -lt 1 ]; then
    echo "usage: $0 --check | $0 WORK [ROUNDS]" >&2
    exit 2
fi
check || exit $?

WORK=$(mkdir -p "$1" && cd "$1" && pwd)
ROUNDS=${2:-2}
N_PATIENTS=${N_PATIENTS:-24}
SEED=${SEED:-5}
DATA_SEED=${DATA_SEED:-11}
if [ -n "$(ls -A "$WORK")" ]; then
    echo "$WORK is not empty" >&2
    exit 2
fi
LOGS="$WORK/logs"
mkdir -p "$LOGS"
# The checkout's package (a real machine has phems_clinical and flwr installed).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEPLOY=("$PY" -m phems_clinical.federation.flower.deploy)
ALL_NS=("$NS_C" "${NS_H[@]}" "$NS_SW")

stop_ns_processes() {  # every process in a namespace of this run (all started here)
    local sig=$1 ns pids
    for ns in "${ALL_NS[@]}"; do
        [ -e "/var/run/netns/$ns" ] || continue
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill "-$sig" $pids 2>/dev/null || true
    done
}

cleanup() {
    local rc=$? ns left
    trap - EXIT INT TERM
    stop_ns_processes TERM
    for _ in $(seq 1 50); do
        left=""
        for ns in "${ALL_NS[@]}"; do
            [ -e "/var/run/netns/$ns" ] && left+=$(ip netns pids "$ns" 2>/dev/null || true)
        done
        [ -z "$left" ] && break
        sleep 0.2
    done
    stop_ns_processes KILL
    for ns in "${ALL_NS[@]}"; do
        [ -e "/var/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
    done
    echo "torn down: namespaces ${ALL_NS[*]}" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

can_connect() {  # can_connect NS HOST PORT -> prints true/false
    if in_ns "$1" "$PY" -c "import socket,sys
s = socket.socket(); s.settimeout(2.0)
sys.exit(0 if s.connect_ex(('$2', $3)) == 0 else 1)" 2>/dev/null; then
        echo true
    else
        echo false
    fi
}

echo "== network: switch $NS_SW, coordinator $NS_C, hospitals ${NS_H[*]}" >&2
for ns in "${ALL_NS[@]}"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n "$NS_SW" link add br0 type bridge
ip -n "$NS_SW" link set br0 up
attach() {  # attach NS PORTNAME IP
    ip -n "$NS_SW" link add "$2" type veth peer name eth0 netns "$1"
    ip -n "$NS_SW" link set "$2" master br0 up
    ip -n "$1" addr add "$3/24" dev eth0
    ip -n "$1" link set eth0 up
}
attach "$NS_C" p-coord "$COORD_IP"
for k in $(seq 0 $((K - 1))); do attach "${NS_H[$k]}" "p-h$k" "$(hip "$k")"; done

# A listener at hospital 1 (the target of the isolation probes).
in_ns "${NS_H[1]}" "$PY" -c "import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('$(hip 1)', 7000)); s.listen(16)
while True:
    c, _ = s.accept(); c.close()" >"$LOGS/probe_listener.log" 2>&1 &
sleep 1
before_h0_h1=$(can_connect "${NS_H[0]}" "$(hip 1)" 7000)
before_c_h1=$(can_connect "$NS_C" "$(hip 1)" 7000)

echo "== isolation: hospital bridge ports isolated; firewall per namespace" >&2
for k in $(seq 0 $((K - 1))); do
    ip netns exec "$NS_SW" bridge link set dev "p-h$k" isolated on
done
FIREWALL=false
if command -v nft >/dev/null; then
    FIREWALL=true
    HOSPITALS=$(for k in $(seq 0 $((K - 1))); do printf '%s, ' "$(hip "$k")"; done)
    in_ns "$NS_C" nft -f - <<EOF
table inet phems {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    ip saddr { ${HOSPITALS%, } } tcp dport $PORT ct state new accept
  }
}
EOF
    for ns in "${NS_H[@]}"; do
        in_ns "$ns" nft -f - <<EOF
table inet phems {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
  }
  chain output {
    type filter hook output priority 0; policy drop;
    oif lo accept
    ct state established,related accept
    ip daddr $COORD_IP tcp dport $PORT ct state new accept
  }
}
EOF
    done
else
    echo "nft is not installed: bridge isolation only, no per-namespace firewall" >&2
fi
after_h0_h1=$(can_connect "${NS_H[0]}" "$(hip 1)" 7000)
after_c_h1=$(can_connect "$NS_C" "$(hip 1)" 7000)
after_h1_self=$(can_connect "${NS_H[1]}" "$(hip 1)" 7000)

echo "== data: $K simulated hospitals, $N_PATIENTS patients in all" >&2
"$PY" -c "import jax
from pathlib import Path
from phems_clinical.runtime import configure_jax
from phems_clinical.federation.flower.launch import simulate_sites
configure_jax()
sites = simulate_sites(jax.random.key($DATA_SEED), Path('$WORK/data'), $N_PATIENTS)
for k, d in enumerate(sites):  # hospital k's own data folder
    home = Path('$WORK') / f'hospital_{k}'
    home.mkdir()
    d.rename(home / 'site')
"
rmdir "$WORK/data"

echo "== data user: key and signed request" >&2
mkdir -p "$WORK/data_user"
PUBLIC=$("$PY" -m phems_clinical.app.cli governance keygen --out "$WORK/data_user/user.key" \
    | sed -n 's/^public_key: //p')
"$PY" -m phems_clinical.app.cli governance sign-request --key "$WORK/data_user/user.key" \
    --requester pk-consortium --experiment haemophilia_fviii --algorithm fed_focei \
    --rounds "$ROUNDS" --out "$WORK/data_user/request.txt" >/dev/null

echo "== coordinator-init (CA; SuperLink certificate for $COORD_IP:$PORT)" >&2
"${DEPLOY[@]}" coordinator-init --dir "$WORK/coordinator" --address "$COORD_IP:$PORT" \
    > "$LOGS/coordinator-init.log"

echo "== site-init at each hospital (its policy, its keys)" >&2
for k in $(seq 0 $((K - 1))); do
    H="$WORK/hospital_$k"
    cat > "$H/policy.yaml" <<EOF
site: site_$k
min_cohort_size: 5
allowed_fields: [ofv, grad, hess]
data_users:
  - id: pk-consortium
    epsilon_budget: 1.0
    require_dp: false
    experiments: ['haemophilia_*']
    public_key: $PUBLIC
EOF
    # the CA certificate reaches the hospital as a copy (ca.crt is public)
    cp "$WORK/coordinator/ca/ca.crt" "$H/received_ca.crt"
    "${DEPLOY[@]}" site-init --dir "$H/deploy" --site-dir "$H/site" \
        --ca "$H/received_ca.crt" --policy "$H/policy.yaml" > "$LOGS/site-init_$k.log"
done

echo "== superlink (namespace $NS_C)" >&2
in_ns "$NS_C" "${DEPLOY[@]}" superlink --dir "$WORK/coordinator" \
    > "$LOGS/superlink.log" 2>&1 &
LINK_PID=$!
for i in $(seq 1 600); do
    kill -0 "$LINK_PID" 2>/dev/null || { echo "superlink exited; see $LOGS/superlink.log" >&2; exit 1; }
    [ "$(can_connect "$NS_C" "$COORD_IP" "$PORT")" = true ] && break
    [ "$i" = 600 ] && { echo "superlink did not listen within 120 s" >&2; exit 1; }
    sleep 0.2
done

echo "== register each hospital's public key" >&2
for k in $(seq 0 $((K - 1))); do
    cp "$WORK/hospital_$k/deploy/keys/supernode.pub" "$WORK/coordinator/hospital_$k.pub"
    in_ns "$NS_C" "${DEPLOY[@]}" register --dir "$WORK/coordinator" --site "hospital_$k" \
        --public-key "$WORK/coordinator/hospital_$k.pub" > "$LOGS/register_$k.log"
done

echo "== supernode at each hospital (namespace ${NS_H[*]})" >&2
for k in $(seq 0 $((K - 1))); do
    in_ns "${NS_H[$k]}" "${DEPLOY[@]}" supernode --dir "$WORK/hospital_$k/deploy" \
        --superlink "$COORD_IP:$PORT" --site-index "$k" --num-sites "$K" \
        > "$LOGS/supernode_$k.log" 2>&1 &
done

echo "== submit ($ROUNDS rounds of federated FOCEI, seed $SEED)" >&2
in_ns "$NS_C" "${DEPLOY[@]}" submit --dir "$WORK/coordinator" --run fit \
    --rounds "$ROUNDS" --seed "$SEED" --request "$WORK/data_user/request.txt" \
    --requester pk-consortium --experiment haemophilia_fviii --timeout 900 \
    > "$WORK/submit.json"

during_h0_coord=$(can_connect "${NS_H[0]}" "$COORD_IP" "$PORT")
during_h0_h1=$(can_connect "${NS_H[0]}" "$(hip 1)" 7000)
cat > "$WORK/reachability.json" <<EOF
{"firewall": $FIREWALL,
 "before": {"h0_to_h1": $before_h0_h1, "coord_to_h1": $before_c_h1},
 "after": {"h0_to_h1": $after_h0_h1, "coord_to_h1": $after_c_h1,
           "h1_to_itself": $after_h1_self},
 "during_run": {"h0_to_superlink": $during_h0_coord, "h0_to_h1": $during_h0_h1}}
EOF
cat "$WORK/submit.json"
echo "== done: $WORK/coordinator/runs/fit/result.json" >&2
