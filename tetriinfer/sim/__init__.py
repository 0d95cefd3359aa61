"""Discrete-event cluster simulator over the `sched` policies, with cost models (DESIGN.md)."""
