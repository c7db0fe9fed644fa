import struct

import pytest
import xxhash

from kvmesh.kv.errors import InvalidTokenError
from kvmesh.kv.hashing import HASH_SEED, hash_block, hash_blocks, root_hash

# Golden vectors: a change here changes every block hash in every deployment.
GOLDEN_ROOT_SMOLLM2 = 0xE326CEDBF2D35495
GOLDEN_ROOT_WITH_ADAPTER = 0xE0F4E06AF6C0A1CA
GOLDEN_CHAIN_0_TO_9_BS4 = [0x8417099D442C8479, 0x94FB7A1092E5FF4C]
GOLDEN_LLAMA_1_TO_8_BS4 = [0x53F8708E42B297BD, 0xCDE3001212A893CE]
GOLDEN_EDGE_TOKENS = 0x3CFDCAE69DDFB31C
GOLDEN_ROOT_FP8 = 0xF0D41D30FC0CB2AF


def test_golden_vectors() -> None:
    root = root_hash("SmolLM2-135M-Instruct")
    assert root == GOLDEN_ROOT_SMOLLM2
    assert root_hash("m", "lora-a") == GOLDEN_ROOT_WITH_ADAPTER
    assert hash_blocks(list(range(10)), 4, root) == GOLDEN_CHAIN_0_TO_9_BS4
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, root_hash("llama")) == GOLDEN_LLAMA_1_TO_8_BS4
    assert hash_block(root, [0, 2**32 - 1, 49151, 7]) == GOLDEN_EDGE_TOKENS
    assert root_hash("m", kv_dtype="fp8_e4m3") == GOLDEN_ROOT_FP8


def test_the_kv_dtype_is_folded_in_after_the_salt() -> None:
    material = b"kvmesh/v1\x00m\x00\x00salt:t\x00kv:fp8_e4m3"
    assert root_hash("m", salt="t", kv_dtype="fp8_e4m3") == xxhash.xxh3_64_intdigest(
        material, seed=HASH_SEED
    )
    assert len({root_hash("m", kv_dtype=d) for d in ("", "bfloat16", "fp8_e4m3")}) == 3


def test_matches_the_written_definition() -> None:
    """Recompute from the docstring's formula with xxhash directly."""
    root = xxhash.xxh3_64_intdigest(b"kvmesh/v1\x00SmolLM2-135M-Instruct\x00", seed=HASH_SEED)
    assert root == root_hash("SmolLM2-135M-Instruct")
    block = struct.pack("<Q", root) + struct.pack("<4I", 0, 1, 2, 3)
    first = xxhash.xxh3_64_intdigest(block, seed=HASH_SEED)
    block = struct.pack("<Q", first) + struct.pack("<4I", 4, 5, 6, 7)
    second = xxhash.xxh3_64_intdigest(block, seed=HASH_SEED)
    assert hash_blocks(list(range(10)), 4, root) == [first, second]


def test_only_full_blocks_are_hashed() -> None:
    root = root_hash("m")
    assert hash_blocks([1, 2, 3], 4, root) == []
    assert len(hash_blocks(list(range(8)), 4, root)) == 2
    assert len(hash_blocks(list(range(11)), 4, root)) == 2


def test_chaining_makes_equal_blocks_differ_by_prefix() -> None:
    root = root_hash("m")
    a = hash_blocks([9, 9, 9, 9, 5, 5, 5, 5], 4, root)
    b = hash_blocks([8, 8, 8, 8, 5, 5, 5, 5], 4, root)
    assert a[1] != b[1]
    assert a[0] != b[0]


def test_model_id_is_folded_in() -> None:
    tokens = list(range(16))
    assert hash_blocks(tokens, 4, root_hash("a")) != hash_blocks(tokens, 4, root_hash("b"))
    assert root_hash("m", "adapter") != root_hash("m")


def test_extension_from_a_later_block_equals_full_hashing() -> None:
    root = root_hash("m")
    tokens = list(range(40))
    full = hash_blocks(tokens, 8, root)
    head = hash_blocks(tokens[:16], 8, root)
    tail = hash_blocks(tokens, 8, head[-1], start_block=2)
    assert head + tail == full


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_rejects_tokens_that_do_not_fit_u32(bad: int) -> None:
    with pytest.raises(InvalidTokenError):
        hash_blocks([1, 2, bad, 4], 4, root_hash("m"))


def test_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks([1, 2], 0, root_hash("m"))
