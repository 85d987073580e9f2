#!/usr/bin/env bash
# Build the p2pchat container images: p2pchat-directory and p2pchat-agent (tag $IMAGE_TAG, or
# else $P2PCHAT_TAG, the tag docker-compose.yml runs; default latest).
#
#   scripts/images.sh            online if the public base image is here or can be pulled, else
#                                offline (also when the local base image exists already)
#   OFFLINE=1 scripts/images.sh  offline: no image registry, no package index inside `docker build`
#   OFFLINE=0 scripts/images.sh  online: FROM $BASE_IMAGE (python:3.11-slim), pip from the index
#   SCALE=1 scripts/images.sh    also p2pchat-postgres, the PostgreSQL of the replicas
#                                (docker-compose.yml's `scale` profile): online FROM
#                                $POSTGRES_BASE_IMAGE (postgres:15-bookworm); offline FROM a second
#                                debootstrap image, p2pchat-postgres-base:bookworm (minbase +
#                                postgresql-15), made once per Docker engine like the base image
#
# Offline makes a local Debian base image (p2pchat-base:bookworm) with debootstrap, once per
# Docker engine, and the wheels of p2pchat and its dependencies on the host (build/wheels, the
# dependencies downloaded again only when pyproject.toml's dependencies change), then builds the
# same Dockerfiles with --build-arg BASE_IMAGE=... --build-arg WHEELS=build/wheels.
#
# Images whose label p2pchat.source matches the current sources are not rebuilt (FORCE=1 does).
# Needs: docker; offline also debootstrap (root) and a Python with pip (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

OFFLINE=${OFFLINE:-auto}
IMAGE_TAG=${IMAGE_TAG:-${P2PCHAT_TAG:-latest}}
ONLINE_BASE=${BASE_IMAGE:-python:3.11-slim}
OFFLINE_BASE=${OFFLINE_BASE_IMAGE:-p2pchat-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
PY=${PYTHON:-.venv/bin/python}
WHEELS=build/wheels
WHEEL_CACHE=${P2PCHAT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/p2pchat/wheels}
FORCE=${FORCE:-0}
PULL_TIMEOUT=${PULL_TIMEOUT:-120}
SCALE=${SCALE:-0}
ONLINE_POSTGRES_BASE=${POSTGRES_BASE_IMAGE:-postgres:15-bookworm}
OFFLINE_POSTGRES_BASE=${OFFLINE_POSTGRES_BASE_IMAGE:-p2pchat-postgres-base:$SUITE}
POSTGRES_PACKAGE=${POSTGRES_PACKAGE:-postgresql-15}

log() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not running (docker info fails)"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# --- choose the mode ----------------------------------------------------------------------
if [ "$OFFLINE" = auto ]; then
  if have_image "$ONLINE_BASE"; then
    OFFLINE=0
  elif have_image "$OFFLINE_BASE"; then
    OFFLINE=1 # this engine went the offline way before
  elif timeout "$PULL_TIMEOUT" docker pull -q "$ONLINE_BASE" >/dev/null 2>&1; then
    OFFLINE=0
  else
    log "cannot pull $ONLINE_BASE: building offline (OFFLINE=1)"
    OFFLINE=1
  fi
fi

# --- offline: the local base image --------------------------------------------------------
root=""
remove_rootfs() {
  [ -n "$root" ] && [ -d "$root" ] || return 0
  # A debootstrap cut short may leave proc, sys or device mounts inside: never rm through them.
  awk -v r="$root/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
  rm -rf "$root" "$root.log"
}

# bootstrap_image IMAGE PACKAGES WHAT CMD: debootstrap minbase + PACKAGES (comma-separated)
# into a temporary rootfs on the host, trimmed, imported as IMAGE (CMD ["CMD"]); skipped when
# IMAGE exists. Only debootstrap (on the host) fetches anything.
bootstrap_image() {
  local image=$1 packages=$2 what=$3 cmd=$4
  if have_image "$image"; then
    log "base image $image present"
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root to build $image"
  root=$(mktemp -d /tmp/p2pchat-rootfs.XXXXXX)
  trap remove_rootfs EXIT
  log "debootstrap $SUITE (minbase + $what) into $root; takes a few minutes, once"
  local t0=$SECONDS
  timeout 1200 debootstrap --variant=minbase --include="$packages" \
    "$SUITE" "$root" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; die "debootstrap failed"; }
  rm -f "$root.log"
  # Trim what a runtime image never uses; and what PostgreSQL's packages make when installed:
  # a default cluster (the image's entrypoint makes its own in the volume) and ssl-cert's
  # snakeoil key (a private key no image should carry).
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/* "$root"/tmp/* \
    "$root"/var/lib/postgresql/* "$root"/etc/postgresql/* \
    "$root"/etc/ssl/private/ssl-cert-snakeoil.key "$root"/etc/ssl/certs/ssl-cert-snakeoil.pem
  tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "CMD [\"$cmd\"]" \
    --message "debootstrap --variant=minbase $SUITE + $what (scripts/images.sh)" \
    - "$image" >/dev/null
  remove_rootfs
  trap - EXIT
  log "base image $image built in $((SECONDS - t0)) s"
}

build_base() {
  bootstrap_image "$OFFLINE_BASE" python3,python3-venv,ca-certificates python3 python3
}

# --- offline: the wheels ------------------------------------------------------------------
# Wheels for the image's Python (3.11, glibc 2.36 on bookworm), whatever the host runs.
PY_VERSION=${IMAGE_PYTHON_VERSION:-3.11}
GLIBC_MINOR=${IMAGE_GLIBC_MINOR:-36}

build_wheels() {
  [ -x "$PY" ] || PY=python3
  "$PY" -m pip --version >/dev/null 2>&1 || die "offline builds need a Python with pip for the wheels: run 'make install' (or make images OFFLINE=1)"
  mkdir -p "$WHEELS"
  local arch stamp_file stamp
  arch=$(uname -m)
  stamp_file="$WHEELS/.deps-stamp"
  stamp=$("$PY" - "$PY_VERSION" "$GLIBC_MINOR" "$arch" <<'PYEOF'
import hashlib, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(hashlib.sha256("\n".join([*sys.argv[1:], *sorted(deps)]).encode()).hexdigest())
PYEOF
)
  # The project's own wheel, every time (reproducible: same sources, same bytes).
  rm -f "$WHEELS"/p2pchat-*.whl
  SOURCE_DATE_EPOCH=315532800 "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" . \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) ||
    die "pip wheel of the project failed"
  rm -rf build/lib build/bdist.* 2>/dev/null || true
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
    log "dependency wheels up to date in $WHEELS"
    return
  fi
  find "$WHEELS" -name '*.whl' ! -name 'p2pchat-*.whl' -delete
  # Kept outside the work tree too, so that a fresh clone (as in CI) downloads nothing.
  local cache="$WHEEL_CACHE/$stamp"
  if [ ! -f "$cache/.complete" ]; then
    log "downloading dependency wheels for cp${PY_VERSION/./} manylinux glibc<=2.$GLIBC_MINOR $arch"
    local platforms=() minor tmp
    for ((minor = GLIBC_MINOR; minor >= 17; minor--)); do
      platforms+=(--platform "manylinux_2_${minor}_${arch}")
    done
    platforms+=(--platform "manylinux2014_$arch" --platform "manylinux2010_$arch" --platform "manylinux1_$arch")
    mkdir -p "$WHEEL_CACHE"
    tmp=$(mktemp -d "$WHEEL_CACHE/.download.XXXXXX")
    "$PY" -m pip download --quiet --only-binary=:all: --dest "$tmp" \
      --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" \
      "$WHEELS"/p2pchat-*.whl 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) ||
      { rm -rf "$tmp"; die "pip download of the dependencies failed"; }
    rm -f "$tmp"/p2pchat-*.whl
    rm -rf "$cache"
    mv "$tmp" "$cache"
    touch "$cache/.complete"
  else
    log "dependency wheels from the cache $cache"
  fi
  cp "$cache"/*.whl "$WHEELS"/
  echo "$stamp" >"$stamp_file"
}

# --- the service images -------------------------------------------------------------------
source_hash() {
  # What goes into the images: the files the .dockerignore lets in (minus build/wheels, which
  # is derived from them), the Dockerfiles, and the base image; not services/postgres (the
  # PostgreSQL image's own, see build_postgres).
  {
    echo "$1"
    local files=(pyproject.toml README.md proto/gen services scripts/healthcheck.py .dockerignore)
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git ls-files -co --exclude-standard -- "${files[@]}"
    else
      find "${files[@]}" -type f
    fi | grep -v -e '__pycache__' -e '\.pyc$' -e '\.egg-info/' -e '^services/postgres/' |
      LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -c1-16
}

build_image() {
  local service=$1 base=$2 hash=$3 image="p2pchat-$1:$IMAGE_TAG"
  shift 3
  if [ "$FORCE" != 1 ] && have_image "$image" &&
    [ "$(docker image inspect -f '{{index .Config.Labels "p2pchat.source"}}' "$image")" = "$hash" ]; then
    log "$image is up to date"
    return
  fi
  log "building $image (base $base)"
  local t0=$SECONDS
  docker build --quiet --file "services/$service/Dockerfile" --tag "$image" \
    --build-arg "BASE_IMAGE=$base" --label "p2pchat.source=$hash" "$@" "${BUILD_CONTEXT:-.}" >/dev/null
  log "$image built in $((SECONDS - t0)) s"
}

# p2pchat-postgres (SCALE=1 only): its build context is services/postgres alone.
build_postgres() {
  local base=$ONLINE_POSTGRES_BASE id=""
  if [ "$OFFLINE" = 1 ]; then
    base=$OFFLINE_POSTGRES_BASE
    bootstrap_image "$base" "$POSTGRES_PACKAGE" "$POSTGRES_PACKAGE" postgres
    id=$(docker image inspect -f '{{.Id}}' "$base")
  fi
  local hash
  hash=$({ echo "$base $id"; (cd services/postgres && LC_ALL=C sha256sum -- *); } | sha256sum | cut -c1-16)
  BUILD_CONTEXT=services/postgres build_image postgres "$base" "$hash"
}

t_start=$SECONDS
if [ "$OFFLINE" = 1 ]; then
  base=$OFFLINE_BASE
  build_base
  hash=$(source_hash "$base $(docker image inspect -f '{{.Id}}' "$base")")
  if [ "$FORCE" = 1 ] || [ "$(docker image inspect -f '{{index .Config.Labels "p2pchat.source"}}' \
    "p2pchat-agent:$IMAGE_TAG" 2>/dev/null)" != "$hash" ] ||
    [ "$(docker image inspect -f '{{index .Config.Labels "p2pchat.source"}}' \
      "p2pchat-directory:$IMAGE_TAG" 2>/dev/null)" != "$hash" ]; then
    build_wheels
  fi
  for service in directory agent; do
    build_image "$service" "$base" "$hash" --build-arg "WHEELS=$WHEELS"
  done
else
  base=$ONLINE_BASE
  hash=$(source_hash "$base")
  for service in directory agent; do
    build_image "$service" "$base" "$hash"
  done
fi
built="p2pchat-directory:$IMAGE_TAG p2pchat-agent:$IMAGE_TAG"
if [ "$SCALE" = 1 ]; then
  build_postgres
  built+=" p2pchat-postgres:$IMAGE_TAG"
fi
# Untagged leftovers of earlier builds (replaced service images, build stages) only take space.
docker image prune --force --filter label=p2pchat.source >/dev/null
docker image prune --force --filter label=p2pchat.stage=build >/dev/null
log "images ready in $((SECONDS - t_start)) s: $built"
