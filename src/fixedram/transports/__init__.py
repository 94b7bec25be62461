"""Migration transports addressed by QEMU's URIs (file, tcp, unix, exec, fd)."""
