#!/usr/bin/env bash
# `make up`: start docker-compose.yml (images already built) and wait until every container is
# healthy, at most TIMEOUT seconds (first argument, default 180); then say how to attach.
# COMPOSE: the compose command ("docker compose" or "docker-compose"). The images' tag:
# P2PCHAT_TAG, or else IMAGE_TAG (as scripts/images.sh built them), default latest.
# SCALE=1: the `scale` profile's services only (PostgreSQL, directory-a and directory-b behind
# the name `directory`, the agents dave and erin), not the default ones.
set -euo pipefail
cd "$(dirname "$0")/.."

TIMEOUT=${1:-180}
export P2PCHAT_TAG=${P2PCHAT_TAG:-${IMAGE_TAG:-latest}}
read -r -a compose <<<"${COMPOSE:-docker compose}"
services=()
if [ "${SCALE:-}" = 1 ]; then
  compose+=(--profile scale)
  services=(postgres directory-a directory-b dave erin)
fi

# `up` itself waits for the directory (each replica) to be healthy before it starts the agents.
timeout "$TIMEOUT" "${compose[@]}" up --detach --no-build --remove-orphans "${services[@]}"

deadline=$((SECONDS + TIMEOUT))
while :; do
  mapfile -t ids < <("${compose[@]}" ps -q)
  [ ${#ids[@]} -gt 0 ] || { echo "up: no containers are running" >&2; exit 1; }
  waiting=()
  while read -r name state health; do
    [ "$state" = running ] && [ "$health" = healthy ] || waiting+=("${name#/}($state/$health)")
  done < <(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "${ids[@]}")
  [ ${#waiting[@]} -eq 0 ] && break
  if [ $SECONDS -ge $deadline ]; then
    echo "up: not healthy after ${TIMEOUT}s: ${waiting[*]}" >&2
    "${compose[@]}" ps >&2
    "${compose[@]}" logs --tail=30 >&2
    exit 1
  fi
  sleep 1
done

"${compose[@]}" ps
if [ "${SCALE:-}" = 1 ]; then
  cat <<EOF

p2pchat replicas are up: postgres, directory-a and directory-b (one database, one CA, both
answering to the name directory), dave and erin, all healthy. Each agent's calls go round-robin
over both replicas; stop one and they go on on the other:
  ${compose[*]} exec dave p2pchat      # the menu, as with alice; in another terminal: erin
  ${compose[*]} kill directory-a       # then chat on; bring it back: ${compose[*]} start directory-a
Logs: make logs SCALE=1    Stop: make down (data volumes kept; make down PURGE=1 deletes them)
EOF
  exit 0
fi
cat <<EOF

p2pchat is up: directory + alice, bob, carol, all healthy. Attach to an agent's CLI:
  ${compose[*]} exec alice p2pchat      # the menu (register, log in, contacts, chat)
  ${compose[*]} exec bob p2pchat
  ${compose[*]} exec carol p2pchat
Each agent is reached by the others at its service name (alice:50052 ...).
Logs: make logs    Stop: make down (data volumes kept; make down PURGE=1 deletes them)
EOF
