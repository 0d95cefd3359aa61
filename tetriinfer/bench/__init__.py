"""Workloads (real request lengths, arrival processes, traces), load generation against the real
server (`bench serve`) or the simulator (`simulate`), and reports (tables, CDF plots). The metrics
themselves are `tetriinfer.metrics`, shared with `sim`."""
