"""Shared parts of every worker process (prefill and decode)."""
