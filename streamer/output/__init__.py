"""Output bookkeeping of a session folder: the single writer (committer) that appends particles
to the rolling stacks and index files, the sqlite ledger of what was done, and ``status.json``.
"""
