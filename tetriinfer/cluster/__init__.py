"""The running cluster: processes, messages, KV transfer, launchers (DESIGN.md)."""
