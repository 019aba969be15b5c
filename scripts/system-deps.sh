#!/usr/bin/env bash
# Install the OS packages the tests use as independent, real tools.
# Idempotent: does nothing when everything is already present.
# --bench also installs the peers `make bench` measures ato against (restic, borg); `make test` does not.
set -euo pipefail
need=()
if [ "${1:-}" = "--bench" ]; then
  command -v restic >/dev/null 2>&1 || need+=(restic)
  command -v borg >/dev/null 2>&1 || need+=(borgbackup)
  command -v curl >/dev/null 2>&1 || need+=(curl)
fi
command -v b3sum >/dev/null 2>&1 || need+=(b3sum)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v desktop-file-validate >/dev/null 2>&1 || need+=(desktop-file-utils)
# native delivery e2e: a command-mode capsule compiles a tiny C program
(command -v gcc || command -v cc) >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v wrk >/dev/null 2>&1 || need+=(wrk)  # registry load benchmark
# the registry index on PostgreSQL: tests start their own server (initdb + pg_ctl, as nobody when root)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
# OCI targets run under a real podman (root, runc); tests build their image from busybox-static
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
[ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null 2>&1 || need+=(catatonit)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v tmux >/dev/null 2>&1 || need+=(tmux)  # progress bars seen on a real terminal pane
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
  echo "system-deps: missing ${need[*]} and no root/sudo to install them" >&2; exit 1; fi
echo "system-deps: installing ${need[*]}" >&2
# Several checkouts on one machine may run this at once: wait for dpkg's lock instead of failing.
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
$SUDO "${APT[@]}" update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO "${APT[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
