"""A shared-memory frame ring for inference workers on the daemon's host.

Over a socket every byte crosses the kernel twice (ZeroMQ over ipc or tcp),
which caps a 2-core machine at a few GB/s. With the ring the daemon copies a
frame once into a slot of one SharedMemory block and sends only the header
over ZeroMQ; the worker views the pixels where they lie.

Ownership rule (a slot is never overwritten while it is read):
- the daemon is the only writer; it takes a slot only from its free list and
  lends it to one worker by sending that slot's header (PUSH delivers each
  message to exactly one worker);
- the slot goes back on the free list only when that worker releases it
  (slot, generation) in a message, once it has copied out what it needs;
- when no slot is free the frame skips the inference stream (counted):
  acquisition and storage never wait for a worker;
- when no slot is free, slots lent for longer than `reclaim_after_s` (their
  worker died or hung) are reclaimed. A slot's generation counter in shared
  memory is bumped before any pixel is rewritten and readers check it after
  reading, so a late reader notices and drops the frame instead of using
  torn pixels.

Layout: a 4 KiB header (magic, slots, slot bytes, then one uint64
generation per slot), then page-aligned slots.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
import uuid
from collections import deque
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from smartscope.transport.protocol import MalformedMessage, RingRef

MAGIC = 0x534D5343_52494E47  # "SMSCRING"
PAGE = 4096
HEADER_WORDS = 3  # magic, slots, slot_bytes; generations follow
SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory (the ring is Linux-only)
RING_NAME = re.compile(r"smartscope-[0-9]+-[0-9a-f]{8}")


def _slot_offset(slots: int, slot_bytes: int, slot: int) -> int:
    header = -(-(HEADER_WORDS + slots) * 8 // PAGE) * PAGE
    return header + slot * slot_bytes


class FrameRing:
    """The daemon's side: owns the block, the free list and the generations."""

    def __init__(self, slots: int, slot_bytes: int, reclaim_after_s: float = 10.0) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError("a frame ring needs at least one slot of at least one byte")
        self.slots = slots
        self.slot_bytes = -(-slot_bytes // PAGE) * PAGE
        self.reclaim_after_s = reclaim_after_s
        size = _slot_offset(slots, self.slot_bytes, slots)
        self._shm = shared_memory.SharedMemory(create=True, size=size,
                                               name=f"smartscope-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.name = self._shm.name
        try:  # reserve the pages now: a full /dev/shm must fail here, not as SIGBUS in a frame copy
            if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the ring is off unless asked for
                os.posix_fallocate(self._shm._fd, 0, size)
        except OSError as e:
            self._shm.close()
            self._shm.unlink()
            raise OSError(f"cannot reserve {size / 2**20:.0f} MiB in {SHM_DIR} for the frame ring ({e}); "
                          "lower transport.ring_slots or give /dev/shm more room (docker: --shm-size)") from e
        words = np.ndarray((HEADER_WORDS + slots,), np.uint64, buffer=self._shm.buf)
        words[:HEADER_WORDS] = (MAGIC, slots, self.slot_bytes)
        self._gens = words[HEADER_WORDS:]
        self._gens[:] = 0
        self._free: deque[int] = deque(range(slots))
        self._lent: dict[int, tuple[int, float]] = {}  # slot → (generation, monotonic time lent)
        self._lock = threading.Lock()
        self.written = 0
        self.full = 0  # frames that found no free slot
        self.reclaimed = 0
        self.stale_releases = 0  # releases of a generation no longer lent (after a reclaim)

    def put(self, frame: np.ndarray) -> RingRef | None:
        """Copy the frame into a free slot and lend it; None when every slot is lent."""
        if frame.nbytes > self.slot_bytes:
            raise ValueError(f"a {frame.nbytes}-byte frame does not fit a {self.slot_bytes}-byte slot")
        now = time.monotonic()
        with self._lock:
            if not self._free:
                self._reclaim(now)
            if not self._free:
                self.full += 1
                return None
            slot = self._free.popleft()
            gen = int(self._gens[slot]) + 1
            self._gens[slot] = gen  # before the pixels: a late reader of the old generation sees the change
            self._lent[slot] = (gen, now)
        start = _slot_offset(self.slots, self.slot_bytes, slot)
        np.copyto(np.ndarray(frame.shape, frame.dtype, buffer=self._shm.buf, offset=start), frame)
        self.written += 1
        return RingRef(name=self.name, slot=slot, gen=gen)

    def release(self, slot: int, gen: int) -> None:
        """A worker is done with (slot, gen): the slot may be written again."""
        with self._lock:
            lent = self._lent.get(slot)
            if lent is None or lent[0] != gen:
                self.stale_releases += 1
                return
            del self._lent[slot]
            self._free.append(slot)

    def _reclaim(self, now: float) -> None:
        for slot, (_, since) in list(self._lent.items()):
            if now - since > self.reclaim_after_s:
                del self._lent[slot]
                self._free.append(slot)
                self.reclaimed += 1

    @property
    def lent(self) -> int:
        return len(self._lent)

    def stats(self) -> dict[str, int]:
        return {"slots": self.slots, "slot_bytes": self.slot_bytes, "lent": self.lent, "written": self.written,
                "full": self.full, "reclaimed": self.reclaimed, "stale_releases": self.stale_releases}

    def close(self) -> None:
        self._gens = None  # drop the view before the buffer goes
        self._shm.close()
        self._shm.unlink()


class RingReader:
    """A worker's side: maps the daemon's ring(s) read-only by name and views frames in place.

    Linux keeps POSIX shared memory in /dev/shm; mapping the file read-only
    (rather than attaching a SharedMemory) means a worker can never write a
    frame, and Python's resource tracker never unlinks the daemon's block
    when a worker exits.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, tuple[mmap.mmap, int, int, np.ndarray]] = {}

    def _attach(self, name: str) -> tuple[mmap.mmap, int, int, np.ndarray]:
        if name not in self._blocks:
            if not RING_NAME.fullmatch(name):  # only our own rings: no paths, no other /dev/shm objects
                raise MalformedMessage("ring", f"{name!r} is not a smartscope frame ring name")
            self.close()  # a new ring: the daemon restarted, the old ring is gone
            try:
                with open(SHM_DIR / name, "rb") as fh:
                    block = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise MalformedMessage("ring", f"cannot map frame ring {name!r} ({e}): a worker on another "
                                               "host needs the daemon's transport.shared_memory off") from e
            words = np.frombuffer(block, np.uint64, count=HEADER_WORDS) if len(block) >= PAGE else None
            slots, slot_bytes = (int(words[1]), int(words[2])) if words is not None else (0, 0)
            if words is None or int(words[0]) != MAGIC or slots < 1 \
                    or len(block) < _slot_offset(slots, slot_bytes, slots):
                del words
                block.close()
                raise MalformedMessage("ring", f"{name!r} is not a complete smartscope frame ring")
            gens = np.frombuffer(block, np.uint64, count=slots, offset=HEADER_WORDS * 8)
            self._blocks[name] = (block, slots, slot_bytes, gens)
        return self._blocks[name]

    def view(self, ref: RingRef, shape: tuple[int, int], dtype: str) -> np.ndarray:
        """The frame's pixels, in place and read-only (valid until released; check `current` after reading)."""
        block, slots, slot_bytes, _ = self._attach(ref.name)
        nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
        if ref.slot >= slots or nbytes > slot_bytes:
            raise MalformedMessage("ring", f"slot {ref.slot} of {slots} with {nbytes} bytes does not fit the ring")
        offset = _slot_offset(slots, slot_bytes, ref.slot)
        return np.frombuffer(block, dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)

    def current(self, ref: RingRef) -> bool:
        """True while the slot still holds the generation the header named (not reclaimed)."""
        return int(self._attach(ref.name)[3][ref.slot]) == ref.gen

    def close(self) -> None:
        blocks = [block for block, *_ in self._blocks.values()]
        self._blocks.clear()  # drops our generation views first
        for block in blocks:
            try:
                block.close()
            except BufferError:  # a frame view is still alive somewhere: the OS unmaps at exit
                pass
