#!/usr/bin/env bash
# What a commit costs Postgres (docs/BENCHMARKS.md, "What a commit costs Postgres"): runs one of
# the transaction files here under pgbench at a fixed rate and prints Postgres' CPU per
# transaction, read from /proc (the postmaster, its children, and the children it reaped).
#   docs/pgbench/run.sh FILE TPS SECONDS [DATABASE]
# DATABASE (default pgbench_chat) must hold the gateway's schema (start the gateway once with
# DATABASE_URL pointing at it) and rooms r1..r100:
#   INSERT INTO "ChatRoom" (id, name, "updatedAt") SELECT 'r'||g, 'room', now() FROM generate_series(1,100) g;
# Postgres' pid file is read from PG_PIDFILE (default: Debian's for Postgres 15). Extra server
# settings go in EXTRA, e.g. EXTRA="-c synchronous_commit=off".
set -euo pipefail
file=$1 tps=$2 secs=$3 db=${4:-pgbench_chat}
pidfile=${PG_PIDFILE:-/var/run/postgresql/15-main.pid}
ticks() {
    local pm t p s
    pm=$(head -1 "$pidfile")
    t=$(awk '{print $14+$15+$16+$17}' "/proc/$pm/stat")
    for p in $(pgrep -P "$pm"); do
        s=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + ${s:-0}))
    done
    echo "$t"
}
hz=$(getconf CLK_TCK)
# A backend's CPU moves into the postmaster's reaped-children time only once the postmaster has
# reaped it: let the previous run's backends and this run's settle before each reading.
sleep 1
before=$(ticks)
PGOPTIONS="${EXTRA:-} -c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c enable_hashjoin=off -c enable_mergejoin=off" \
    taskset -c 1 pgbench -n -M prepared -h 127.0.0.1 -U postgres -c 2 -j 1 -R "$tps" -T "$secs" -f "$file" "$db" |
    grep -E '^tps'
sleep 1
after=$(ticks)
echo "$file at $tps/s: $(( (after - before) * 1000000 / hz / (tps * secs) )) us of Postgres CPU per transaction"
