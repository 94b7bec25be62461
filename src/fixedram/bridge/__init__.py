"""The bridge between live QEMU migrations and mapped-ram files.

``receive`` turns QEMU's live socket (or ``exec:`` pipe) stream into a
bounded mapped-ram file as pages arrive; ``send`` streams a saved file into
a QEMU waiting with ``-incoming``.
"""
