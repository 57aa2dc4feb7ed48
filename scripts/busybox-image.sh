#!/bin/sh
# Builds a busybox image offline as one tar that is both an OCI image layout (for
# `ctr images import`) and a docker archive (manifest.json, for `docker load`). Host programs
# named after the tag are added with the shared libraries they load (a test image with
# sqlite3, say).
#   scripts/busybox-image.sh OUT.tar [NAME:TAG [PROGRAM...]]   (default smtest/busybox:latest)
set -eu
out=${1:?usage: busybox-image.sh OUT.tar [NAME:TAG [PROGRAM...]]}
ref=${2:-smtest/busybox:latest}
shift $(($# < 2 ? $# : 2))
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$root/scripts/busybox-rootfs.sh" "$work/rootfs"
for program in "$@"; do
  # The program, its loader and every library ldd resolves, at their host paths.
  for file in "$program" $(ldd "$program" | grep -o '/[^ ]*'); do
    mkdir -p "$work/rootfs$(dirname "$file")"
    cp -L "$file" "$work/rootfs$file"
  done
done
mkdir -p "$work/image/blobs/sha256"
blobs="$work/image/blobs/sha256"

# A reproducible layer: sorted, fixed mtimes, numeric owners.
tar --sort=name --mtime=@0 --numeric-owner -C "$work/rootfs" -cf "$work/layer.tar" .
layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar")
mv "$work/layer.tar" "$blobs/$layer"

printf '%s' "{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"1970-01-01T00:00:00Z\",\"config\":{\"Env\":[\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"],\"Cmd\":[\"sh\"],\"WorkingDir\":\"/\"},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$layer\"]},\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"supermachine scripts/busybox-image.sh\"}]}" > "$work/config.json"
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
config_size=$(stat -c %s "$work/config.json")
mv "$work/config.json" "$blobs/$config"

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config\",\"size\":$config_size},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$layer\",\"size\":$layer_size}]}" > "$work/manifest"
manifest=$(sha256sum "$work/manifest" | cut -d' ' -f1)
manifest_size=$(stat -c %s "$work/manifest")
mv "$work/manifest" "$blobs/$manifest"

case "$ref" in
  */*) full="docker.io/$ref" ;;
  *) full="docker.io/library/$ref" ;;
esac
tag=${ref##*:}
printf '%s' "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$manifest\",\"size\":$manifest_size,\"annotations\":{\"io.containerd.image.name\":\"$full\",\"org.opencontainers.image.ref.name\":\"$tag\"}}]}" > "$work/image/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$work/image/oci-layout"
printf '%s' "[{\"Config\":\"blobs/sha256/$config\",\"RepoTags\":[\"$ref\"],\"Layers\":[\"blobs/sha256/$layer\"]}]" > "$work/image/manifest.json"

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/image" -cf "$out.tmp" .
mv "$out.tmp" "$out"
