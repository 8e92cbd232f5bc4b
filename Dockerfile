# The managed plugin's rootfs as an image, built without a registry and
# without a base image: what `make plugin` put in bin/plugin/rootfs (the
# static binary and the directories it uses; no shell, no libc: the plugin
# programs the kernel over netlink and runs no other program).
#
#   make plugin
#   docker build -f Dockerfile -t dnp-rootfs bin/plugin
#
# scripts/push-plugin.sh (make plugin-push PLUGIN_REF=...) builds this
# image, turns it into a plugin (docker create + docker export + config.json,
# then docker plugin create) and pushes it. The integration test
# TestPluginRegistry installs and upgrades exactly what that script pushes.
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["/docker-net-plugin", "serve"]
