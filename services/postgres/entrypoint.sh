#!/bin/sh
# p2pchat-postgres: the PostgreSQL server the directory replicas share (docker-compose.yml,
# profile `scale`). Runs as the image's `postgres` user. On an empty data volume it makes the
# cluster (initdb) and the role and database the directories use, then it serves; on a volume
# made before it just serves. Extra arguments are passed on to `postgres` (e.g. -c name=value).
#
#   P2PCHAT_POSTGRES_DB  name of the database and of the role that owns it (default p2pchat);
#                        the directories connect as postgresql+psycopg://p2pchat@postgres/p2pchat
#
# Authentication: `trust` for that role and database from `samenet` only (the subnets of the
# server's own interfaces: in compose, the internal network that only the directory replicas
# share with it; nothing is published on the host), `peer` on the Unix socket (docker exec -u
# postgres ... psql), nothing else. A password would be one more secret in the compose file,
# readable by whoever can read the file, and would keep out no one who is already on that
# network: only the directories are. Reaching PostgreSQL from elsewhere needs a password and
# TLS, i.e. a pg_hba.conf of your own.
set -eu

PGDATA=${PGDATA:-/var/lib/postgresql/data}
DB=${P2PCHAT_POSTGRES_DB:-p2pchat}
case $DB in
  "" | [!a-z_]* | *[!a-z0-9_]*)
    echo "p2pchat-postgres: P2PCHAT_POSTGRES_DB must be [a-z_][a-z0-9_]*, not '$DB'" >&2
    exit 1
    ;;
esac

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  # Made in a folder of its own, moved in at the end, PG_VERSION last: a start cut short leaves
  # no half cluster that the next start would take for a finished one, only .init, and what
  # is in the volume besides is then from that start too.
  init="$PGDATA/.init"
  if [ -e "$init" ]; then
    find "$PGDATA" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  elif [ -n "$(ls -A "$PGDATA")" ]; then
    echo "p2pchat-postgres: $PGDATA holds files but no cluster (no PG_VERSION): not touching it" >&2
    exit 1
  fi
  echo "p2pchat-postgres: initialising $PGDATA (database and role $DB)" >&2
  initdb --pgdata="$init" --username=postgres --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=reject >/dev/null
  cat >"$init/pg_hba.conf" <<HBA
# TYPE  DATABASE  USER  ADDRESS  METHOD   (written by p2pchat-postgres; see its entrypoint)
local   all       all            peer
host    $DB       $DB   samenet  trust
HBA
  printf '%s\n' "CREATE ROLE \"$DB\" LOGIN" "CREATE DATABASE \"$DB\" OWNER \"$DB\"" |
    postgres --single -D "$init" -c listen_addresses= postgres >/dev/null
  for entry in "$init"/* "$init"/.[!.]*; do
    [ -e "$entry" ] || continue
    case ${entry##*/} in PG_VERSION) continue ;; esac
    mv "$entry" "$PGDATA"/
  done
  mv "$init/PG_VERSION" "$PGDATA/PG_VERSION" # last: what marks the cluster as made
  rmdir "$init"
fi

# Fast shutdown on the image's STOPSIGNAL (SIGINT); logs on stderr, for `docker logs`.
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
