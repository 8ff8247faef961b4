"""Synthetic data: the movie simulator (specimen, motion, detector), the microscope emulator that
writes a session over time, and ``lmc demo`` built on them.
"""
