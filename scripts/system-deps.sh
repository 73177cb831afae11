#!/usr/bin/env bash
# Installs the Debian packages a target needs, when they are missing (as root, with apt-get);
# otherwise says what to install. Usage: scripts/system-deps.sh test|bench
#   test:  PostgreSQL (storage/service suites on PostgreSQL), Chromium (Swagger UI browser test,
#          driven by Playwright with executable_path=/usr/bin/chromium), curl (a real HTTP client),
#          podman with runc and mmdebstrap (tests/containers: the images built and run for real)
#   bench: wrk (REST load)
set -euo pipefail
need=()
case "${1:-}" in
  test)
    command -v pg_ctlcluster >/dev/null || need+=(postgresql)
    [ -x /usr/bin/chromium ] || need+=(chromium)
    command -v curl >/dev/null || need+=(curl ca-certificates)
    command -v podman >/dev/null || need+=(podman)
    command -v runc >/dev/null || need+=(runc)
    command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
    ;;
  bench)
    command -v wrk >/dev/null || need+=(wrk)
    ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]} (sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
