"""The NIXL transfer agent: a decode worker READs a prefill worker's KV blocks, block by block.

Each worker registers its whole paged KV tensor with NIXL once and prepares a descriptor list of
one entry per block, once; a peer's blocks are prepared the same way from its `KvRegion`, once per
peer. A transfer then only names indices into those prepared lists, so a request costs one
`make_prepped_xfer` and one post however its blocks are scattered. The reader drives the READ;
NIXL delivers the reader's `notify` message to the block owner when the READ completes, and the
owner drains those with `take_notifications()` to release its leases.

Progress. NIXL moves data and messages only while someone calls into it: its optional progress
thread busy-spins a core per agent (the Python API fixes its delay at 0), so it is off by
default and the agent is progressed from the event loop instead. A reader progresses its READ
while awaiting it (polling with short asyncio sleeps, so the loop stays free); a block owner must
run `serve()` as a task, because a peer's first READ needs the owner's side of the connection
set up and a READ with `notify` completes only once the owner has received the message.
On DRAM, UCX copies with `process_vm_readv` inside the post itself: the event loop is held for
the copy (other threads run, the GIL is released); on VRAM the post returns at once.

All calls must come from one event loop thread (the NIXL agent runs without locks); the engine
may write other blocks of the same tensor meanwhile, never the blocks a transfer reads or fills.

Security: `KvRegion.metadata` is deserialized by NIXL with pickle. Accept it only from
authenticated mesh peers (`KvTransfer.GetAgentMetadata` behind mesh auth/TLS), never from a client.

The agent is `kvmesh.kv.transfer.agent.KvTransferAgent` (it loads torch and NIXL); the records
it exchanges are in the torch-free `kvmesh.kv.transfer.types`. This package imports neither.
"""
