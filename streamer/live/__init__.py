"""Live machinery: the session loop and its helpers (single writer thread, local worker
supervision, metrics/status, signals, log), the filesystem watcher, the ZeroMQ dispatcher and
workers, the wire protocol and the CURVE keys that authenticate the pool.
"""
