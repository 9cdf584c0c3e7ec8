"""Redis Cluster slots: a short hash tag for every slot.

On Redis Cluster a Lua script may only touch keys of one slot, and every key of a run
shares the run's slot (``{run_id}``). A counter that many runs bump inside their scripts
(the ``/metrics`` counters) is therefore kept once per slot: the shard for a run is the
key tagged with :func:`tag_for_slot` of the run's slot, so it lands on the run's slot,
and readers add up the shards. :func:`slot_of` is Redis's own CRC16 key slot.
"""

from __future__ import annotations

import binascii
import functools

SLOTS = 16384


def slot_of(key: str) -> int:
    """The Cluster slot of ``key`` (its ``{hash tag}`` when it has a non-empty one)."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key.encode(), 0) % SLOTS


@functools.cache
def _table() -> tuple[str, ...]:
    """For each slot, the first tag ``m<n>`` (counting up) that hashes to it."""
    tags: list[str | None] = [None] * SLOTS
    missing, n = SLOTS, 0
    while missing:
        tag = f"m{n}"
        slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def tag_for_slot(slot: int) -> str:
    """A hash tag (without braces) whose slot is ``slot``."""
    return _table()[slot]
