#!/usr/bin/env bash
# `make up`: start docker-compose.yml (images already built) and wait until every container is
# healthy, at most TIMEOUT seconds (first argument, default 180); then say how to attach.
# COMPOSE: the compose command ("docker compose" or "docker-compose").
set -euo pipefail
cd "$(dirname "$0")/.."

TIMEOUT=${1:-180}
read -r -a compose <<<"${COMPOSE:-docker compose}"

# `up` itself waits for the directory to be healthy before it starts the agents.
timeout "$TIMEOUT" "${compose[@]}" up --detach --no-build --remove-orphans

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
cat <<EOF

p2pchat is up: directory + alice, bob, carol, all healthy. Attach to an agent's CLI:
  ${compose[*]} exec alice p2pchat      # the menu (register, log in, contacts, chat)
  ${compose[*]} exec bob p2pchat
  ${compose[*]} exec carol p2pchat
Each agent is reached by the others at its service name (alice:50052 ...).
Logs: make logs    Stop: make down (data volumes kept; make down PURGE=1 deletes them)
EOF
