#!/usr/bin/env bash
# scripts/hosts.sh up|down|status|exec HOST CMD... -- a two-"host" test bed on one machine.
#
# Each host is a network namespace with a real sshd, so `horovodrun -H hostA:2,hostB:2` (Gloo
# or Open MPI) launches over ssh as on a cluster, and the inter-host traffic crosses a link
# capped with tc. Needs root, iproute2 (ip netns, tc) and Debian's openssh-server
# (/usr/sbin/sshd); `up` fails with a clear message when one is missing.
#
# Layout (PREFIX = $HL_HOSTS_PREFIX, default "hlmh"; use a unique one per concurrent user):
#   namespace PREFIX-br   a bridge "br0", the switch; nothing else
#   namespace PREFIX-a    host "hostA": lo + veth "hl0" 10.77.0.1/24 (peer "a0" on br0)
#   namespace PREFIX-b    host "hostB": lo + veth "hl0" 10.77.0.2/24 (peer "b0" on br0)
#   Every veth end, both sides, egress-shaped: tc qdisc tbf rate $HL_HOSTS_RATE (1gbit)
#   [delay netem $HL_HOSTS_DELAY if set, e.g. "1ms"]. A host's traffic to itself (its own
#   10.77.0.x or 127.0.0.1) stays on that namespace's own loopback. The addresses exist only
#   inside these namespaces; the root namespace's interfaces and routes are never touched
#   (the veths are created inside PREFIX-br and moved straight into the host namespaces).
#   sshd per host: runs in the host's namespace and its own UTS namespace (hostname = the
#   host's name, so Open MPI sees two nodes), port 22 on 10.77.0.x and 127.0.0.1, root
#   login with a key generated for the test bed, authorized_keys/host keys/logs/pid files in
#   the state dir /tmp/hl-hosts-PREFIX.
#   Name resolution and ssh client config per namespace through the `ip netns exec` overrides
#   (it bind-mounts /etc/netns/NS/* over /etc/*): /etc/netns/PREFIX-{a,b}/hosts (hostA, hostB)
#   and /etc/netns/PREFIX-{a,b}/ssh/ssh_config (our key, StrictHostKeyChecking no,
#   UserKnownHostsFile /dev/null). Only processes started with `ip netns exec` (or by the
#   sshds, which were) see them; the root namespace's /etc/hosts and ~/.ssh are untouched.
#   The only things made outside those: /run/sshd (sshd's privilege-separation dir) and
#   /etc/netns, if missing; `down` removes them again when it made them and no other test bed
#   (another PREFIX) is up.
#
# Usage:
#   scripts/hosts.sh up       # idempotent: tears down a partial bed first; ~1-2 s
#   scripts/hosts.sh status   # exit 0 iff everything is up and hostA can ssh to both hosts
#   scripts/hosts.sh exec hostA CMD...   # CMD in PREFIX-a, in its own UTS ns (hostname hostA)
#   scripts/hosts.sh down     # removes everything made by up, also after a failed up
# Launch across the hosts from hostA (the launcher runs on the first node, as on a cluster):
#   scripts/hosts.sh exec hostA horovodrun -np 4 -H hostA:2,hostB:2 --gloo \
#       --network-interface hl0 python train.py
#   scripts/hosts.sh exec hostA horovodrun -np 4 -H hostA:2,hostB:2 --mpi \
#       --network-interface hl0 \
#       --mpi-args="--mca btl_tcp_if_include hl0 --mca oob_tcp_if_include hl0" python train.py
# Every wait is bounded (sshd start: 10 s; status's ssh probes: ConnectTimeout 5 s).
set -u -o pipefail

PREFIX=${HL_HOSTS_PREFIX:-hlmh}
RATE=${HL_HOSTS_RATE:-1gbit}
DELAY=${HL_HOSTS_DELAY:-}
STATE=/tmp/hl-hosts-$PREFIX
NS_BR=$PREFIX-br
HOSTS=(hostA hostB)
SUFFIX=(a b)
ADDRS=(10.77.0.1 10.77.0.2)

die() { echo "hosts.sh: $*" >&2; exit 1; }
ns_of() {  # host name -> namespace
  local i
  for i in "${!HOSTS[@]}"; do
    [[ ${HOSTS[$i]} == "$1" ]] && { echo "$PREFIX-${SUFFIX[$i]}"; return 0; }
  done
  return 1
}

preflight() {
  [[ $(id -u) == 0 ]] || die "needs root (ip netns, tc, sshd); uid is $(id -u)"
  command -v ip >/dev/null || die "iproute2 'ip' not found"
  command -v tc >/dev/null || die "'tc' not found (apt-get install iproute2)"
  [[ -x /usr/sbin/sshd ]] || die "/usr/sbin/sshd not found (apt-get install openssh-server)"
  command -v ssh >/dev/null || die "ssh client not found (apt-get install openssh-client)"
  command -v ssh-keygen >/dev/null || die "ssh-keygen not found"
}

kill_sshds() {
  local f pid
  for f in "$STATE"/sshd-*.pid; do
    [[ -f $f ]] || continue
    pid=$(cat "$f" 2>/dev/null) || continue
    # only our own sshd: its command line names our config file
    if [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$STATE/sshd_config"; then
      kill "$pid" 2>/dev/null
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$f"
  done
}

down() {
  kill_sshds
  local s ns
  for s in "${SUFFIX[@]}"; do
    ns=$PREFIX-$s
    if ip netns list | awk '{print $1}' | grep -qxF "$ns"; then
      # any process still in the namespace (ranks, orted, sessions): it was started in our bed
      ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
      ip netns del "$ns" 2>/dev/null
    fi
    rm -rf "/etc/netns/$ns"
  done
  ip netns list | awk '{print $1}' | grep -qxF "$NS_BR" && ip netns del "$NS_BR" 2>/dev/null
  local made_run_sshd=0 made_etc_netns=0
  [[ -f $STATE/made-run-sshd ]] && made_run_sshd=1
  [[ -f $STATE/made-etc-netns ]] && made_etc_netns=1
  rm -rf "$STATE"
  # /run/sshd and /etc/netns: removed only if up made them and no other test bed (state dir)
  # is left that might need them (then that bed's down leaves them: an empty dir at worst)
  if ! compgen -G "/tmp/hl-hosts-*" >/dev/null; then
    ((made_run_sshd)) && rmdir /run/sshd 2>/dev/null
    ((made_etc_netns)) && rmdir /etc/netns 2>/dev/null
  fi
  return 0
}

up() {
  preflight
  down  # idempotent: start from nothing
  mkdir -p "$STATE" && chmod 700 "$STATE" || die "cannot create $STATE"
  if [[ ! -d /run/sshd ]]; then
    mkdir -p /run/sshd && chmod 755 /run/sshd && touch "$STATE/made-run-sshd"
  fi
  [[ -d /etc/netns ]] || touch "$STATE/made-etc-netns"
  ssh-keygen -q -t ed25519 -N '' -C hl-hosts -f "$STATE/id_ed25519" || die "ssh-keygen failed"
  ssh-keygen -q -t ed25519 -N '' -C hl-hosts-host -f "$STATE/ssh_host_ed25519_key" || die "ssh-keygen failed"
  cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
  cat >"$STATE/sshd_config" <<EOF
Port 22
HostKey $STATE/ssh_host_ed25519_key
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
UseDNS no
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
EOF
  cat >"$STATE/ssh_config" <<EOF
Host *
    IdentityFile $STATE/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    ConnectTimeout 10
    BatchMode yes
EOF
  local hosts_file="$STATE/hosts"
  {
    echo "127.0.0.1 localhost"
    local i; for i in "${!HOSTS[@]}"; do echo "${ADDRS[$i]} ${HOSTS[$i]}"; done
  } >"$hosts_file"

  ip netns add "$NS_BR" || die "ip netns add $NS_BR failed"
  ip -n "$NS_BR" link set lo up
  ip -n "$NS_BR" link add br0 type bridge || die "bridge failed"
  ip -n "$NS_BR" link set br0 up
  local i ns peer
  for i in "${!HOSTS[@]}"; do
    ns=$PREFIX-${SUFFIX[$i]}
    peer=${SUFFIX[$i]}0
    ip netns add "$ns" || die "ip netns add $ns failed"
    mkdir -p "/etc/netns/$ns/ssh"
    # plus the machine's own hostname -> this host's address: Gloo resolves gethostname()
    { cat "$hosts_file"; echo "${ADDRS[$i]} $(hostname)"; } >"/etc/netns/$ns/hosts"
    cp "$STATE/ssh_config" "/etc/netns/$ns/ssh/ssh_config"
    ip -n "$ns" link set lo up
    ip -n "$NS_BR" link add "$peer" type veth peer name hl0 netns "$ns" || die "veth for $ns failed"
    ip -n "$NS_BR" link set "$peer" master br0 up
    ip -n "$ns" addr add "${ADDRS[$i]}/24" dev hl0
    ip -n "$ns" link set hl0 up
    local dev netns_of_dev
    for dev in "$ns:hl0" "$NS_BR:$peer"; do
      netns_of_dev=${dev%%:*}; dev=${dev#*:}
      ip netns exec "$netns_of_dev" tc qdisc add dev "$dev" root handle 1: tbf rate "$RATE" \
        burst 256kb latency 50ms || die "tc on $dev failed"
      if [[ -n $DELAY ]]; then
        ip netns exec "$netns_of_dev" tc qdisc add dev "$dev" parent 1:1 handle 10: netem \
          delay "$DELAY" || die "tc netem on $dev failed"
      fi
    done
    # own UTS namespace per host (hostname = host name): Open MPI and Gloo tell nodes apart
    # by hostname, and everything sshd starts inherits it
    ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "${HOSTS[$i]}" \
      /usr/sbin/sshd -f "$STATE/sshd_config" -o "PidFile=$STATE/sshd-$ns.pid" \
      -o "ListenAddress=${ADDRS[$i]}" -o "ListenAddress=127.0.0.1" -E "$STATE/sshd-$ns.log" \
      || die "sshd in $ns failed to start: $(tail -5 "$STATE/sshd-$ns.log" 2>/dev/null)"
  done
  # bounded wait for every sshd to accept connections from hostA
  local deadline=$((SECONDS + 10)) ok
  while :; do
    ok=1
    for i in "${!HOSTS[@]}"; do
      timeout 5 ip netns exec "$PREFIX-a" ssh -o ConnectTimeout=2 "${HOSTS[$i]}" true \
        >/dev/null 2>&1 || { ok=0; break; }
    done
    ((ok)) && break
    ((SECONDS < deadline)) || die "sshd not reachable from hostA within 10 s (logs in $STATE)"
    sleep 0.2
  done
  echo "hosts.sh: up (prefix $PREFIX: ${HOSTS[*]} = ${ADDRS[*]} on hl0, $RATE${DELAY:+ + $DELAY})"
}

status() {
  local rc=0 i ns
  ip netns list | awk '{print $1}' | grep -qxF "$NS_BR" || { echo "$NS_BR: missing"; rc=1; }
  for i in "${!HOSTS[@]}"; do
    ns=$PREFIX-${SUFFIX[$i]}
    if ! ip netns list | awk '{print $1}' | grep -qxF "$ns"; then echo "$ns: missing"; rc=1; continue; fi
    echo "${HOSTS[$i]} ($ns): $(ip -n "$ns" -br addr show hl0 2>/dev/null | tr -s ' ')"
    echo "  qdisc: $(ip netns exec "$ns" tc qdisc show dev hl0 2>/dev/null | head -1)"
    if timeout 8 ip netns exec "$PREFIX-a" ssh -o ConnectTimeout=5 "${HOSTS[$i]}" \
        'ip netns identify $$' 2>/dev/null | grep -qxF "$ns"; then
      echo "  ssh from hostA: ok"
    else
      echo "  ssh from hostA: FAILED"; rc=1
    fi
  done
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down; echo "hosts.sh: down (prefix $PREFIX)" ;;
  status) status ;;
  exec)
    [[ $# -ge 3 ]] || die "usage: hosts.sh exec HOST CMD..."
    ns=$(ns_of "$2") || die "unknown host $2 (one of ${HOSTS[*]})"
    host=$2; shift 2
    exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$host" "$@" ;;
  *) die "usage: hosts.sh up|down|status|exec HOST CMD..." ;;
esac
