#!/usr/bin/env bash
# The arm64 join in containers: the compose testnet's bootstrap and three x86 nodes
# (meshtune:cpu, docker/build.sh) plus node-3, a FROM-scratch linux/arm64 container
# (meshtune:arm64, docker/Dockerfile.arm64) that the engine runs through qemu-user binfmt.
# ROUNDS rounds (default 3) of LOCAL_STEPS (default 2) local steps, the last a pure exchange;
# then docker/scripts/check-join.sh on docker/state/node-{3,0,1,2}: every round combined all 4
# deltas, node-3 among every round's contributors on every node, one start and one final model.
# Needs docker/build-arm64.sh's binaries (it runs it; a no-op when they are built).
set -euo pipefail
cd "$(dirname "$0")"
export ROUNDS="${ROUNDS:-3}" LOCAL_STEPS="${LOCAL_STEPS:-2}"
./build.sh 4
./build-arm64.sh
rm -rf context-arm64/data && cp -a context/data context-arm64/data
cp Dockerfile.arm64 context-arm64/Dockerfile
docker build --platform linux/arm64 -t meshtune:arm64 context-arm64
if docker compose version >/dev/null 2>&1; then
  compose() { docker compose -p meshtune-arm64 -f compose.yml -f compose.arm64.yml "$@"; }
else
  compose() { docker-compose -p meshtune-arm64 -f compose.yml -f compose.arm64.yml "$@"; }
fi
container_of() {
  docker ps -aq --filter label=com.docker.compose.project=meshtune-arm64 \
    --filter "label=com.docker.compose.service=$1" | head -1
}
compose down -v --remove-orphans >/dev/null 2>&1 || true
rm -rf state && mkdir -p state/node-0 state/node-1 state/node-2 state/node-3
trap 'compose logs --no-color > state/compose.log 2>&1 || true; compose down -v >/dev/null 2>&1 || true' EXIT
start=$(date +%s)
compose up -d
arch="$(docker image inspect -f '{{.Architecture}}' meshtune:arm64)"
[ "$arch" = arm64 ] || { echo "meshtune:arm64 is $arch" >&2; exit 1; }
for node in node-0 node-1 node-2 node-3; do
  code="$(docker wait "$(container_of "$node")")"
  [ "$code" = 0 ] || { echo "$node exited with $code" >&2; exit 1; }
done
elapsed=$(($(date +%s) - start))
scripts/check-join.sh "$ROUNDS" state/node-3 state/node-0 state/node-1 state/node-2
echo "arm64 join (compose, node-3 in a linux/arm64 container) took ${elapsed} s"
