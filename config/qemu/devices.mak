# The devices of supermachine's own QEMU build (scripts/build-qemu.sh): the microvm machine
# (which selects its serial port, interrupt controllers, clock and virtio-mmio transports) and
# the virtio devices the qemu engine attaches. Nothing else is compiled in.
CONFIG_MICROVM=y
CONFIG_VIRTIO_SERIAL=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_NET=y
# Free page reporting and a host-set memory target (memory given back to the host).
CONFIG_VIRTIO_BALLOON=y
