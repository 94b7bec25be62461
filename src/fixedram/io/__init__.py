"""Byte sources under the codec: files, pipes, decoders, qcow2 snapshots."""
