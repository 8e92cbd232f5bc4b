# The managed plugin's rootfs as an image, for publishing the plugin to a
# registry. It holds what scripts/build-plugin.sh puts in bin/plugin/rootfs:
# the static binary and a few empty directories; nothing else (no shell, no
# libc: the plugin programs the kernel over netlink and runs no program).
#
#   docker build -t dnp-rootfs .
#   id=$(docker create dnp-rootfs)
#   mkdir -p plugin/rootfs && docker export "$id" | tar -x -C plugin/rootfs && docker rm "$id"
#   cp config.json plugin/
#   docker plugin create YOURORG/dnp:TAG plugin && docker plugin push YOURORG/dnp:TAG
#
# Without a registry, scripts/build-plugin.sh (make plugin) builds the same
# directory without Docker images at all.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
      -o /rootfs/docker-net-plugin ./cmd/docker-net-plugin \
 && mkdir -p /rootfs/run/docker/plugins /rootfs/run/dnp /rootfs/var/lib/docker-net-plugin \
      /rootfs/etc/docker-net-plugin /rootfs/tmp \
 && chmod 1777 /rootfs/tmp

FROM scratch
COPY --from=build /rootfs/ /
ENTRYPOINT ["/docker-net-plugin", "serve"]
