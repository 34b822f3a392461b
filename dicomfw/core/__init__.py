"""Sans-IO core: bytes in, events and decisions out. No sockets, clocks, files or globals."""
