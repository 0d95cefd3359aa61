"""Scheduling policies as plain Python over plain state.

Nothing in this package imports torch, does I/O or reads a clock: time is passed in and randomness
comes from a seeded generator, so the real cluster and the simulator run the very same objects.
"""
