"""The migration engine: capabilities, built-in guest, precopy, sinks, incoming, QMP."""
