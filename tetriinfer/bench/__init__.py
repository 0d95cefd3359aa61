"""Workloads (real request lengths, arrival processes) and metrics, shared by the simulator and by
benchmarks against the real server."""
