#!/usr/bin/env bash
# `make images`: builds the three images from the unchanged Dockerfiles (the files Cloud Build uses),
# tagged payments-server:local, payments-envoy:local and payments-swagger-ui:local.
# The engine is docker where it answers, podman otherwise (ENGINE=podman|docker to choose).
#
# With podman, two facts of the build machine are handled here, never in a Dockerfile:
# - containers get default ulimits no higher than this machine's hard limits (a containers.conf of
#   this project's own, unless CONTAINERS_CONF names one), or none of them starts;
# - the machine's CA bundle is handed to the build stages that download (pip, the Swagger UI
#   tarball) as an extra local CA, so a TLS-intercepting proxy is trusted where this machine trusts
#   it. The runtime stages install no CA store, so nothing of it reaches an image's final layer.
#   IMAGES_HOST_CA=0 turns it off.
# Usage: scripts/images.sh [server|envoy|swagger-ui ...]   (default: all three)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(server envoy swagger-ui)

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else
    echo "no container engine: install docker, or podman (apt-get install podman buildah runc)" >&2
    exit 1
  fi
fi

opts=()
if [ "$engine" = podman ]; then
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    mkdir -p "$root/.tools"
    export CONTAINERS_CONF=$root/.tools/containers.conf
    scripts/containers-conf.sh > "$CONTAINERS_CONF"
  fi
  bundle=/etc/ssl/certs/ca-certificates.crt
  if [ "${IMAGES_HOST_CA:-1}" != 0 ] && [ -s "$bundle" ]; then
    opts+=(--volume "$bundle:/usr/local/share/ca-certificates/build-host.crt:ro")
  fi
fi

scripts/base-image.sh "$engine"
for name in "${names[@]}"; do
  start=$(date +%s)
  "$engine" build "${opts[@]}" -q -f "Dockerfile.$name" -t "payments-$name:local" . >/dev/null
  size=$("$engine" image inspect --format '{{.Size}}' "payments-$name:local")
  echo "payments-$name:local  $((size / 1000000)) MB  built in $(( $(date +%s) - start )) s"
done
