from kvmesh.kv.events import AllCleared, BlockRemoved, BlockStored, KvEventLog
from kvmesh.kv.hashing import BlockHash


def _stored(event_id: int) -> BlockStored:
    return BlockStored(event_id, (BlockHash(event_id),), None)


def test_reader_gets_events_after_its_id() -> None:
    log = KvEventLog()
    log.extend([_stored(1), _stored(2), BlockRemoved(3, (BlockHash(1),)), AllCleared(4)])
    batch = log.read_after(2)
    assert [e.event_id for e in batch.events] == [3, 4]
    assert not batch.gap
    assert batch.last_event_id == 4
    assert log.read_after(4).events == ()


def test_reader_behind_the_log_sees_a_gap() -> None:
    log = KvEventLog(capacity=2)
    log.extend([_stored(1), _stored(2), _stored(3)])
    assert log.read_after(0).gap
    assert not log.read_after(1).gap
    assert [e.event_id for e in log.read_after(1).events] == [2, 3]
