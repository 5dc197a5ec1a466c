#!/usr/bin/env bash
# Faults for the compose testnet: fault.sh ACTION NODE   (NODE: node-0, node-1, ...)
#   kill       SIGKILL the node's container (no goodbye, as a crash)
#   restart    start it again: it resumes from its checkpoint in docker/state/NODE
#   pause      freeze it (SIGSTOP via cgroups): peers see a silent node
#   unpause    thaw it
#   cut-off    disconnect it from the mesh network (a partition of one)
#   reconnect  connect it again with its address
set -euo pipefail
action="${1:?action}"; node="${2:?node}"
project="${COMPOSE_PROJECT_NAME:-meshtune}"
# Compose v1 and v2 name containers differently; their labels are the same.
container="$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
  --filter "label=com.docker.compose.service=$node" | head -1)"
[ -n "$container" ] || { echo "no container for service $node in project $project" >&2; exit 1; }
network="${project}_mesh"
case "$action" in
  kill) docker kill --signal KILL "$container" ;;
  restart) docker start "$container" ;;
  pause) docker pause "$container" ;;
  unpause) docker unpause "$container" ;;
  cut-off) docker network disconnect "$network" "$container" ;;
  reconnect)
    index="${node#node-}"
    docker network connect --ip "172.28.0.$((20 + index))" "$network" "$container" ;;
  *) echo "unknown action $action" >&2; exit 2 ;;
esac
