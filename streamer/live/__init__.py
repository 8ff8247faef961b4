"""Live machinery: the session loop, the filesystem watcher, the ZeroMQ dispatcher and workers,
the wire protocol and the CURVE keys that authenticate the pool.
"""
