#!/usr/bin/env bash
# A three-"host" Redis Cluster in Linux network namespaces, for tests.
#
#   scripts/redis-cluster-ns.sh up   PREFIX WORKDIR     set up; prints the node list last
#   scripts/redis-cluster-ns.sh down PREFIX WORKDIR     tear down (never fails)
#   scripts/redis-cluster-ns.sh kill PREFIX WORKDIR N   kill -9 node N's redis-server
#
# up creates a bridge ${PREFIX}br in the root namespace with address $SUBNET.254/24, the
# namespaces ${PREFIX}1..3, each joined to the bridge by a veth pair (${PREFIX}vN in the
# root namespace, eth0 inside) with address $SUBNET.N/24, and starts in each namespace a
# cluster-mode redis-server on $SUBNET.N:7000 (files in WORKDIR/nN: redis.conf,
# nodes.conf, redis.pid, redis.log). It waits for every node to answer PING, creates the
# cluster (three masters, no replicas), waits for cluster_state:ok on every node and prints
# "$SUBNET.1:7000 $SUBNET.2:7000 $SUBNET.3:7000" as the last line on stdout. It runs a
# silent `down` first, so leftovers of an earlier run do not matter.
#
# SUBNET is $CONCORD_SUBNET (the first three octets), default 10.231.0. PREFIX must be
# at most 13 characters (interface names are at most 15).
#
# Exit status: 0 done; 1 failure (up undoes what it did); 2 usage; 77 not root, or `ip`,
# redis-server or redis-cli missing (Debian: apt-get install iproute2 redis-server).
set -u

SUBNET=${CONCORD_SUBNET:-10.231.0}
PORT=7000
NODES=3

usage() {
	echo "usage: $0 up|down PREFIX WORKDIR" >&2
	echo "       $0 kill PREFIX WORKDIR N" >&2
	exit 2
}

die() {
	echo "redis-cluster-ns: $*" >&2
	exit 1
}

[ $# -ge 3 ] || usage
cmd=$1
prefix=$2
workdir=$3

case "$prefix" in
'' | *[!A-Za-z0-9_-]*) echo "redis-cluster-ns: bad PREFIX '$prefix' (letters, digits, _ and -)" >&2; exit 2 ;;
esac
if [ ${#prefix} -gt 13 ]; then
	echo "redis-cluster-ns: PREFIX '$prefix' is longer than 13 characters" >&2
	exit 2
fi
case "$SUBNET" in
*[!0-9.]* | *.*.*.* | '') echo "redis-cluster-ns: bad CONCORD_SUBNET '$SUBNET' (like 10.231.0)" >&2; exit 2 ;;
esac
[ -n "$workdir" ] || usage

br=${prefix}br

node_ip() { echo "$SUBNET.$1"; }
node_dir() { echo "$workdir/n$1"; }

# The bridge-netfilter rule that lets the namespaces reach each other when
# br_netfilter sends bridged traffic through an iptables FORWARD chain that drops.
fw_rule() { echo "FORWARD -i $br -o $br -j ACCEPT"; }

# The pid in a pidfile if it is a live redis-server, else nothing.
redis_pid() {
	local f pid
	f="$(node_dir "$1")/redis.pid"
	[ -r "$f" ] || return 1
	pid=$(cat "$f" 2>/dev/null) || return 1
	case "$pid" in '' | *[!0-9]*) return 1 ;; esac
	grep -q redis "/proc/$pid/comm" 2>/dev/null || return 1
	echo "$pid"
}

do_down() {
	local i pid ns t
	for i in $(seq 1 $NODES); do
		if pid=$(redis_pid "$i"); then
			kill "$pid" 2>/dev/null
			for t in $(seq 1 50); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
			kill -9 "$pid" 2>/dev/null
		fi
		rm -f "$(node_dir "$i")/redis.pid"
		ns=$prefix$i
		if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns"; then
			# Whatever else still runs in our namespace (by pid).
			for pid in $(ip netns pids "$ns" 2>/dev/null); do
				kill -9 "$pid" 2>/dev/null
			done
			ip netns del "$ns" 2>/dev/null
		fi
		ip link del "${prefix}v$i" 2>/dev/null
	done
	ip link del "$br" 2>/dev/null
	if command -v iptables >/dev/null 2>&1; then
		# shellcheck disable=SC2046
		while iptables -C $(fw_rule) 2>/dev/null; do
			iptables -D $(fw_rule) 2>/dev/null || break
		done
	fi
	return 0
}

need_root_tools() {
	if [ "$(id -u)" -ne 0 ]; then
		echo "redis-cluster-ns: needs root (network namespaces)" >&2
		exit 77
	fi
	command -v ip >/dev/null 2>&1 || { echo "redis-cluster-ns: needs ip (Debian: apt-get install iproute2)" >&2; exit 77; }
}

fail_up() {
	local i f
	echo "redis-cluster-ns: $*" >&2
	for i in $(seq 1 $NODES); do
		f="$(node_dir "$i")/redis.log"
		if [ -s "$f" ]; then
			echo "--- tail of $f" >&2
			tail -n 15 "$f" >&2
		fi
	done
	do_down
	exit 1
}

# cli IP ARGS...: redis-cli against one node, bounded in time.
cli() {
	local ip=$1
	shift
	timeout 3 redis-cli -h "$ip" -p $PORT "$@"
}

do_up() {
	local i ns ip dir t ok nodes=""
	need_root_tools
	local missing=""
	for tool in redis-server redis-cli; do
		command -v "$tool" >/dev/null 2>&1 || missing="$missing${missing:+ }$tool"
	done
	if [ -n "$missing" ]; then
		echo "redis-cluster-ns: needs redis-server and redis-cli (Debian: apt-get install redis-server); missing: $missing" >&2
		exit 77
	fi

	do_down
	mkdir -p "$workdir" || die "cannot create $workdir"
	workdir=$(cd "$workdir" && pwd)

	# Refuse a subnet that an interface outside ours already uses.
	if ip -4 -o addr show 2>/dev/null | awk '{print $2, $4}' |
		grep -v "^$br " | grep -q " ${SUBNET//./\\.}\."; then
		die "subnet $SUBNET.0/24 is already in use here (set CONCORD_SUBNET)"
	fi

	ip link add "$br" type bridge || fail_up "cannot create bridge $br"
	ip addr add "$SUBNET.254/24" dev "$br" || fail_up "cannot address $br"
	ip link set "$br" up || fail_up "cannot bring $br up"

	for i in $(seq 1 $NODES); do
		ns=$prefix$i
		ip=$(node_ip "$i")
		ip netns add "$ns" || fail_up "cannot create namespace $ns"
		ip link add "${prefix}v$i" type veth peer name "${prefix}p$i" ||
			fail_up "cannot create veth ${prefix}v$i"
		ip link set "${prefix}p$i" netns "$ns" || fail_up "cannot move ${prefix}p$i to $ns"
		ip -n "$ns" link set "${prefix}p$i" name eth0 || fail_up "cannot rename eth0 in $ns"
		ip link set "${prefix}v$i" master "$br" || fail_up "cannot attach ${prefix}v$i"
		ip link set "${prefix}v$i" up || fail_up "cannot bring ${prefix}v$i up"
		ip -n "$ns" link set lo up || fail_up "cannot bring lo up in $ns"
		ip -n "$ns" addr add "$ip/24" dev eth0 || fail_up "cannot address eth0 in $ns"
		ip -n "$ns" link set eth0 up || fail_up "cannot bring eth0 up in $ns"
	done

	if command -v iptables >/dev/null 2>&1 &&
		[ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ]; then
		# shellcheck disable=SC2046
		iptables -I $(fw_rule) 2>/dev/null
	fi

	for i in $(seq 1 $NODES); do
		ns=$prefix$i
		ip=$(node_ip "$i")
		dir=$(node_dir "$i")
		mkdir -p "$dir" || fail_up "cannot create $dir"
		rm -f "$dir/nodes.conf" "$dir/dump.rdb" "$dir/redis.log" "$dir/redis.pid"
		rm -rf "$dir/appendonlydir"
		cat >"$dir/redis.conf" <<EOF
port $PORT
bind $ip
protected-mode no
cluster-enabled yes
cluster-config-file $dir/nodes.conf
cluster-node-timeout 1000
cluster-require-full-coverage no
cluster-allow-reads-when-down yes
dir $dir
appendonly no
save ""
daemonize yes
pidfile $dir/redis.pid
logfile $dir/redis.log
EOF
		ip netns exec "$ns" redis-server "$dir/redis.conf" ||
			fail_up "redis-server did not start in $ns"
		nodes="$nodes${nodes:+ }$ip:$PORT"
	done

	for i in $(seq 1 $NODES); do
		ip=$(node_ip "$i")
		ok=0
		for t in $(seq 1 100); do
			if [ "$(cli "$ip" ping 2>/dev/null)" = PONG ]; then
				ok=1
				break
			fi
			sleep 0.1
		done
		[ $ok = 1 ] || fail_up "$ip:$PORT does not answer PING after 10 s"
	done

	# shellcheck disable=SC2086
	if ! timeout 60 redis-cli --cluster create $nodes --cluster-replicas 0 --cluster-yes \
		>"$workdir/cluster-create.log" 2>&1; then
		cat "$workdir/cluster-create.log" >&2
		fail_up "redis-cli --cluster create failed"
	fi

	for i in $(seq 1 $NODES); do
		ip=$(node_ip "$i")
		ok=0
		for t in $(seq 1 200); do
			if cli "$ip" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then
				ok=1
				break
			fi
			sleep 0.1
		done
		[ $ok = 1 ] || fail_up "$ip:$PORT does not report cluster_state:ok after 20 s"
	done

	echo "$nodes"
}

do_kill() {
	local n=$1 pid
	case "$n" in '' | *[!0-9]*) usage ;; esac
	[ "$n" -ge 1 ] && [ "$n" -le $NODES ] || usage
	if pid=$(redis_pid "$n"); then
		kill -9 "$pid" || die "cannot kill node $n (pid $pid)"
		for _ in $(seq 1 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
	else
		die "node $n: no live redis-server (pidfile $(node_dir "$n")/redis.pid)"
	fi
}

case "$cmd" in
up)
	[ $# -eq 3 ] || usage
	do_up
	;;
down)
	[ $# -eq 3 ] || usage
	do_down
	exit 0
	;;
kill)
	[ $# -eq 4 ] || usage
	do_kill "$4"
	;;
*) usage ;;
esac
