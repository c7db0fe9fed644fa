"""The decode service: continue requests from a KV handle (NIXL READ) or by prefilling locally."""
