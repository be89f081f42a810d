#!/usr/bin/env bash
# A local stand-in for the Dockerfile's BASE (python:3.11-slim) on a machine that cannot reach
# Docker Hub: a minimal Debian root file system made by debootstrap from the Debian mirror apt on
# this machine uses, with python3, python3-venv and ca-certificates, a virtual environment at
# /opt/venv first on PATH (so `python` and `pip` are the venv's, as in python:3.11-slim), and this
# machine's pip settings (index URLs, CA bundle, constraints), so that pip inside a build reaches
# the package index as pip on this machine does. Nothing of this goes into the project's Dockerfile.
#
#   sudo docker/build-local-base.sh [TAG]          # default tag: toolkit-base:local
#   docker build --build-arg BASE=toolkit-base:local -t toolkit-demo .
#
# Needs root, debootstrap and a running Docker engine (Debian: apt-get install debootstrap docker.io).
set -euo pipefail
TAG="${1:-toolkit-base:local}"

# the first Debian mirror apt uses (deb822 .sources files or the one-line sources.list)
mirror="$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
if [ -z "$mirror" ]; then
    mirror="$(awk '$1 == "deb" && $3 !~ /security|updates|backports/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
suite="$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")"
[ -n "$mirror" ] || { echo "error: no Debian mirror found in apt's sources" >&2; exit 1; }

root="$(mktemp -d /tmp/toolkit-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap $suite from $mirror -> $TAG"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror" >/dev/null
chroot "$root" python3 -m venv /opt/venv

# this machine's CA bundle and pip settings: index URLs over the network only (file:// indexes and
# --find-links folders of this machine are not in the image), certificate, timeout, constraints
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
{
    echo "[global]"
    { pip config list 2>/dev/null || true; } | sed -n "s/^global\.\(index-url\|extra-index-url\|trusted-host\|timeout\|default-timeout\)='\(.*\)'$/\1 \2/p" |
        while read -r key values; do
            kept="$(for v in $values; do case "$v" in file:*|/*) ;; *) printf '%s ' "$v" ;; esac; done)"
            if [ -n "$kept" ]; then echo "$key = ${kept% }"; fi
        done
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    constraints="$(pip config list 2>/dev/null | sed -n "s/^global\.constraint='\(.*\)'$/\1/p")"
    if [ -n "$constraints" ] && [ -f "$constraints" ]; then
        cp "$constraints" "$root/etc/pip-constraints.txt"
        echo "constraint = /etc/pip-constraints.txt"
    fi
} > "$root/etc/pip.conf"

rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' - "$TAG" >/dev/null
echo "$TAG: $(docker image inspect --format '{{.Size}}' "$TAG") bytes"
