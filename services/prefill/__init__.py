"""The prefill service: compute a prompt's KV, sample the first token, lease the KV to decode."""
