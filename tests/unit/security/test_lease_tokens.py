"""Lease releases count only with the lease's token: by RPC, and by NIXL notification."""

from __future__ import annotations

import pytest

from kvmesh.errors import AuthorizationError
from kvmesh.worker.leases import LeaseTable, new_release_token, release_message


class Exports:
    def __init__(self) -> None:
        self.released: list[str] = []
        self.notifications: list[tuple[str, bytes]] = []

    async def release(self, request_id: str) -> None:
        self.released.append(request_id)

    def take(self) -> list[tuple[str, bytes]]:
        taken, self.notifications = self.notifications, []
        return taken


async def test_a_release_needs_the_leases_token() -> None:
    exports = Exports()
    leases = LeaseTable(exports.release)
    token = new_release_token()
    leases.grant("r1", 30.0, token)
    with pytest.raises(AuthorizationError, match="held by another peer"):
        await leases.release("r1", new_release_token())
    assert leases.active == 1 and exports.released == []
    assert await leases.release("r1", token)
    assert not await leases.release("r1", token)  # released already
    assert exports.released == ["r1"] and leases.stats.refused == 1


async def test_a_notification_without_the_token_releases_nothing() -> None:
    exports = Exports()
    leases = LeaseTable(exports.release, take_notifications=exports.take)
    token = new_release_token()
    leases.grant("r:1", 30.0, token)  # request ids may hold the separator
    exports.notifications = [
        ("intruder", release_message("r:1", new_release_token())),
        ("intruder", b"kvmesh-release:r:1"),  # the old format, with no token
        ("intruder", b"kvmesh-release:zz:r:1"),  # not hex
    ]
    await leases._release_notified()
    assert leases.active == 1 and exports.released == []
    exports.notifications = [("decode-1", release_message("r:1", token))]
    await leases._release_notified()
    assert leases.active == 0 and exports.released == ["r:1"]
    await leases.stop()
