"""KV cache mechanisms shared by workers and the router: hashing (`hashing`), the block pool and
prefix cache (`block_pool`), KV events (`events`), the paged cache tensor (`cache`) and the NIXL
transfer agent (`transfer`).

Import the submodule you need: this package imports nothing itself, so the router can hash
blocks without loading torch or NIXL.
"""
