"""The KV layout contract: fingerprints read into fields, and which layouts decode can read."""

from __future__ import annotations

import pytest

from kvmesh.kv.layout import KV_FORMAT, LayoutSpec, compatible, parse

SMOLLM2 = "kvmesh-kv/v1:LT2HD:L30:H3:D64:B16:f32"


def test_a_fingerprint_reads_into_its_fields() -> None:
    spec = parse(SMOLLM2, transfer_mode="mesh")
    assert spec == LayoutSpec(SMOLLM2, KV_FORMAT, "LT2HD", 30, 3, 64, 16, "f32", "mesh")
    assert not spec.is_opaque
    assert parse(SMOLLM2).transfer_mode is None
    assert parse(SMOLLM2, transfer_mode="").transfer_mode is None  # meta without the key


@pytest.mark.parametrize(
    "fingerprint",
    [
        "kvmesh-sim/v1:H100:B16",  # another format: not ours to read
        "kvmesh-kv/v1:LT2HD:L30:H3:D64:B16",  # a field short
        "kvmesh-kv/v1:LT2HD:L30:H3:D64:Bx:f32",  # not a number
        "kvmesh-kv/v1:LT2HD:L30:X3:D64:B16:f32",  # a field out of place
        "",
    ],
)
def test_other_and_malformed_fingerprints_are_opaque(fingerprint: str) -> None:
    spec = parse(fingerprint)
    assert spec.is_opaque
    assert spec.fingerprint == fingerprint
    assert spec.block_size is None and spec.dtype is None


def test_equal_layouts_are_compatible_whatever_the_attention_backend() -> None:
    # sdpa and paged workers report the same fingerprint: nothing in it names the backend.
    assert compatible(SMOLLM2, SMOLLM2) is None
    assert compatible(parse(SMOLLM2, transfer_mode="mesh"), parse(SMOLLM2)) is None


@pytest.mark.parametrize(
    ("decode", "difference"),
    [
        ("kvmesh-kv/v1:LT2HD:L30:H3:D64:B16:f8", "dtype f32 vs f8"),  # no such dtype
        ("kvmesh-kv/v1:LT2HD:L24:H3:D64:B64:f16", "layers 30 vs 24"),
        ("kvmesh-kv/v1:LT2HD:L30:H5:D64:B16:f32", "KV heads 3 vs 5"),
        ("kvmesh-kv/v1:LT2HD:L30:H3:D128:B16:f32", "head dim 64 vs 128"),
        ("kvmesh-kv/v1:LTH2D:L30:H3:D64:B16:f32", "order LT2HD vs LTH2D"),
        ("kvmesh-sim/v1:H100:B16", "format kvmesh-kv/v1 vs kvmesh-sim/v1"),
        ("", "format kvmesh-kv/v1 vs (none)"),
    ],
)
def test_each_difference_is_named_prefill_first(decode: str, difference: str) -> None:
    assert compatible(SMOLLM2, decode) == difference


@pytest.mark.parametrize(
    "decode",
    [
        "kvmesh-kv/v1:LT2HD:L30:H3:D64:B64:f32",
        "kvmesh-kv/v1:LT2HD:L30:H3:D64:B4:f32",
        "kvmesh-kv/v1:LT2HD:L30:H3:D64:B16:bf16",
        "kvmesh-kv/v1:LT2HD:L30:H3:D64:B16:e4m3",
        "kvmesh-kv/v1:LT2HD:L30:H3:D64:B64:f16",
    ],
)
def test_block_size_and_dtype_convert_on_import(decode: str) -> None:
    assert compatible(SMOLLM2, decode) is None
    assert compatible(decode, SMOLLM2) is None


def test_opaque_layouts_are_compatible_only_when_equal() -> None:
    sim = "kvmesh-sim/v1:L30:B16:bf16"
    assert compatible(sim, sim) is None
    assert compatible(sim, "kvmesh-sim/v1:L30:B32:bf16") == (
        "layout kvmesh-sim/v1:L30:B16:bf16 vs kvmesh-sim/v1:L30:B32:bf16"
    )
    assert compatible("kvmesh-kv/v1:broken", SMOLLM2) == f"layout kvmesh-kv/v1:broken vs {SMOLLM2}"
    assert compatible("acme/v3:x", "acme/v3:x") is None


def test_transfer_modes_must_agree_where_both_are_known() -> None:
    mesh, engine = parse(SMOLLM2, transfer_mode="mesh"), parse(SMOLLM2, transfer_mode="engine")
    assert compatible(mesh, engine) == "transfer mode mesh vs engine"
    assert compatible(mesh, SMOLLM2) is None  # a handle does not say: the layout decides
    mixed = parse("kvmesh-kv/v1:LT2HD:L32:H3:D64:B32:f32", transfer_mode="engine")
    assert compatible(mesh, mixed) == "layers 30 vs 32; transfer mode mesh vs engine"
