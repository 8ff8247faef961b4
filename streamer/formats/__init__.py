"""File formats, read and written: movies (MRC, MRC.bz2, TIFF, EER), gain references, picks,
particle stacks, RELION STAR and cryoSPARC .cs files, trajectories and plots.

Nothing here knows about the live machinery (sessions, workers, sockets): each module turns
bytes on disk into arrays and tables, or back, with atomic writes where a reader may look.
"""
