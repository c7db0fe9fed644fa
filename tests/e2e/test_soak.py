"""The chaos soak, two minutes of it (`kvmesh soak --minutes 2`): traffic through the edge of a
mesh with two routers, two prefill and two decode workers, while a random one of them or the
registry is SIGKILLed every 20 s and supervision restarts it. No request fails, no greedy
answer differs from the reference taken before the chaos, and nothing is left pinned."""

from __future__ import annotations

from pathlib import Path

from kvmesh.bench import soak


async def test_two_minutes_of_chaos_lose_nothing(tmp_path: Path) -> None:
    report = await soak.run(
        minutes=2, rate=4, kill_every_s=20, max_tokens=16, prompts=12, log_dir=tmp_path / "logs"
    )
    assert report["sent"] == 480 and report["kills"] >= 5
    assert report["failed"] == 0, report["first_failures"]
    assert report["completed"] == report["sent"]
    assert report["greedy_mismatches"] == 0, report["mismatches"]
    assert report["leaked"] == {"leases": 0, "pinned_blocks": 0}, report["workers_at_end"]
    assert sum(report["restarts"].values()) >= report["kills"] - 1  # the last may still restart
