#!/usr/bin/env bash
# Installs the Debian packages a target needs, when they are missing (as root, with apt-get);
# otherwise says what to install. Usage: scripts/system-deps.sh test|bench|images
#   test:  PostgreSQL (storage/service suites on PostgreSQL), Chromium (Swagger UI browser test,
#          driven by Playwright with executable_path=/usr/bin/chromium), curl (a real HTTP client),
#          podman with runc and mmdebstrap (tests/containers: the images built and run for real)
#   bench: wrk (REST load)
#   images: podman with runc and mmdebstrap, unless docker runs here
set -euo pipefail
need=()
need_full=()
containers=false
case "${1:-}" in
  test)
    command -v pg_ctlcluster >/dev/null || need+=(postgresql)
    [ -x /usr/bin/chromium ] || need+=(chromium)
    command -v curl >/dev/null || need+=(curl ca-certificates)
    containers=true
    ;;
  bench)
    command -v wrk >/dev/null || need+=(wrk)
    ;;
  images)
    { command -v docker >/dev/null && docker info >/dev/null 2>&1; } || containers=true
    ;;
  *) echo "usage: $0 test|bench|images" >&2; exit 2 ;;
esac
if $containers; then
  # With their recommends (netavark, aardvark-dns, iptables, catatonit: pods publish ports).
  for tool in podman buildah runc mmdebstrap; do
    command -v $tool >/dev/null || need_full+=($tool)
  done
fi
[ ${#need[@]} -eq 0 ] && [ ${#need_full[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]} ${need_full[*]} (sudo apt-get install ${need[*]} ${need_full[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]} ${need_full[*]}" >&2
apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
if [ ${#need_full[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_full[@]}" >&2
fi
