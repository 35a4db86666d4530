#!/usr/bin/env bash
# Emulated hosts on this one machine, for multi-host runs and tests (root; Linux network namespaces).
#   tools/hosts.sh up N            N hosts hist-h1..hist-hN: a network namespace each, loopback up,
#                                  an address 10.77.0.<k>/24 on a bridge that lives in a namespace of
#                                  its own (hist-switch), so nothing touches this machine's network
#                                  and nothing is routed off it; /etc/netns/<host>/hosts names them
#                                  all. Idempotent: hosts already up are left as they are.
#   tools/hosts.sh exec HOST CMD...  CMD inside HOST's namespace, with HOST as its hostname (a UTS
#                                  namespace of its own), as if logged in there.
#   tools/hosts.sh rsh HOST CMD... the same, as Open MPI's remote agent (plm_rsh_agent) calls it:
#                                  CMD arrives as words of one shell command line; ssh's options
#                                  are dropped. tools/hosts-ssh/ssh is this under ssh's name, for
#                                  launchers that call ssh from PATH (horovodrun).
#   tools/hosts.sh down            removes everything `up` made.
#   tools/hosts.sh list            the hosts that are up, one "name address" a line.
# Open MPI reaches the hosts with  mpirun --mca plm_rsh_agent "$PWD/tools/hosts.sh rsh" -H hist-h1:2,hist-h2:2
# started from inside the first host (tools/hosts.sh exec hist-h1 mpirun ...); docs/cluster.md has the commands.
set -euo pipefail

prefix=hist-h
switch=hist-switch
subnet=10.77.0
say() { printf 'hosts.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

hosts() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}[0-9]+$" | sort -t h -k3 -n || true; }
address() { echo "$subnet.$((${1#"$prefix"} + 1))"; }

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces); run as root or skip the multi-host runs"
  ip netns list >/dev/null 2>&1 || die "ip netns does not work here: network namespaces are not allowed"
}

up() {
  local n=${1:-}
  [[ "$n" =~ ^[1-9][0-9]*$ ]] && [ "$n" -le 200 ] || die "up N: N must be a whole number from 1 to 200, not '${n}'"
  need_root
  if ! ip netns list | grep -qw "$switch"; then
    ip netns add "$switch"
    ip -n "$switch" link add br0 type bridge
    ip -n "$switch" link set br0 up
    ip -n "$switch" link set lo up
  fi
  local k host
  for k in $(seq 1 "$n"); do
    host=$prefix$k
    if ! ip netns list | grep -qw "$host"; then
      ip netns add "$host"
      ip -n "$host" link set lo up
      # one cable: eth0 in the host, its other end on the switch's bridge
      ip link add "h${k}eth0" netns "$host" type veth peer name "port$k" netns "$switch"
      ip -n "$host" link set "h${k}eth0" name eth0
      ip -n "$host" addr add "$(address "$host")/24" dev eth0
      ip -n "$host" link set eth0 up
      ip -n "$switch" link set "port$k" master br0
      ip -n "$switch" link set "port$k" up
    fi
  done
  # every host knows every other by name (ip netns exec mounts /etc/netns/<host>/hosts on /etc/hosts)
  local table
  table=$(printf '127.0.0.1 localhost\n'; for host in $(hosts); do echo "$(address "$host") $host"; done)
  for host in $(hosts); do
    mkdir -p "/etc/netns/$host"
    echo "$table" >"/etc/netns/$host/hosts"
  done
  list
}

down() {
  need_root
  local host
  for host in $(hosts); do
    ip netns pids "$host" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$host"
    rm -rf "/etc/netns/$host"
  done
  if ip netns list | grep -qw "$switch"; then ip netns del "$switch"; fi
}

list() { local host; for host in $(hosts); do echo "$host $(address "$host")"; done; }

enter() {  # enter HOST: the namespace and a hostname of its own
  local host=${1:-}
  [ -n "$host" ] || die "exec HOST CMD...: name a host (tools/hosts.sh list)"
  ip netns list | grep -qw "$host" || die "no host '$host' is up: tools/hosts.sh up N first, or tools/hosts.sh list"
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  list) list ;;
  exec)
    enter "${1:-}"; host=$1; shift
    [ $# -gt 0 ] || die "exec $host CMD...: give a command"
    exec ip netns exec "$host" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$host" "$@"
    ;;
  rsh)
    # Called as ssh is: [options] HOST [options] COMMAND-LINE, by Open MPI (plm_rsh_agent) and,
    # through tools/hosts-ssh/ssh, by horovodrun; ssh's options (with the values of those that
    # take one: -o X, -p N, -i FILE, ...) mean nothing here and are dropped.
    host=
    while [ $# -gt 0 ]; do
      case "$1" in
        -[BbcDEeFIiJLlmOoPpQRSWw]) shift; [ $# -gt 0 ] && shift ;;
        -*) shift ;;
        *) [ -n "$host" ] && break; host=$1; shift ;;
      esac
    done
    enter "$host"
    exec ip netns exec "$host" unshare --uts sh -c 'hostname "$0" && eval "$1"' "$host" "$*"
    ;;
  *) die "usage: tools/hosts.sh up N | exec HOST CMD... | rsh HOST CMD | down | list" ;;
esac
