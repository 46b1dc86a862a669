"""torchrun support: ranks share the shards; rank 0 decides, seals and speaks for the store.

The processes coordinate through the key-value store torchrun already runs (the env://
rendezvous), not through collectives. A rank waiting for the others polls that store, so it
notices at once when another rank has published a failure, whether or not that rank ever comes
to the meeting point; a rank that is busy embedding checks between batches. One failing rank
therefore ends every rank within a second, each with a one-line error naming it, instead of
leaving the others blocked in a collective until a 30-minute timeout. Every wait has its own
timeout too (WAIT_TIMEOUT_S), for a rank that hangs rather than fails. No process group is
created, so none can be left behind.

Every rank runs the same sequence of `step`, `broadcast` and `gather` calls: that sequence is
the protocol, and the keys are numbered by it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, TypeVar

from ..errors import GeoscoutError

T = TypeVar("T")
WAIT_TIMEOUT_S = 15 * 60  # the longest a rank waits for the others at one meeting point
POLL_S = 0.05
CHECK_EVERY_S = 0.5  # how often a busy rank looks for a published failure
LEAVE_TIMEOUT_S = 60.0


class PeerFailed(GeoscoutError, RuntimeError):
    """Another process of the same torchrun job failed (its own error says why), or went silent."""


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    store: Any = None  # torch.distributed.Store shared by the ranks; None when running alone
    prefix: str = "geoscout/"
    timeout_s: float = WAIT_TIMEOUT_S
    _seq: int = 0
    _last_check: float = field(default=0.0, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- failures ---------------------------------------------------------------------------

    def publish_failure(self, exc: BaseException) -> None:
        """Tell the other ranks this one failed (best effort: the store may be gone already)."""
        if not self.distributed or isinstance(exc, PeerFailed):  # only the first cause is news
            return
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            self.store.set(f"{self.prefix}failed/{self.rank}", f"{type(exc).__name__}: {message}")
            self.store.add(f"{self.prefix}failures", 1)
        except Exception:  # noqa: BLE001 - nothing more to tell anyone
            pass

    def check(self, *, throttle: bool = False) -> None:
        """Raise PeerFailed when another rank has published a failure."""
        if not self.distributed:
            return
        now = time.monotonic()
        if throttle and now - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = now
        if self._store_call(lambda: self.store.add(f"{self.prefix}failures", 0)) > 0:
            failed = [r for r in range(self.world_size) if r != self.rank
                      and self._store_call(lambda r=r: self.store.check([f"{self.prefix}failed/{r}"]))]
            if failed:
                what = self._store_call(lambda: self.store.get(f"{self.prefix}failed/{failed[0]}").decode())
                raise PeerFailed(f"stopped because the torchrun process of rank {failed[0]} failed ({what})")

    def _store_call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except PeerFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - the store's errors differ across torch versions
            raise PeerFailed(
                f"lost contact with the other torchrun processes (their key-value store went away: {exc}); "
                "another process has probably died"
            ) from exc

    # -- meeting points ---------------------------------------------------------------------

    def _key(self, name: str) -> str:
        self._seq += 1
        return f"{self.prefix}{self._seq}/{name}"

    def _wait(self, keys: list[str], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.check()
            if self._store_call(lambda: self.store.check(keys)):
                return
            if time.monotonic() > deadline:
                missing = [k for k in keys if not self._store_call(lambda k=k: self.store.check([k]))]
                raise PeerFailed(
                    f"waited {self.timeout_s / 60:.0f} minutes at '{what}' for {len(missing)} other torchrun "
                    "process(es), which neither finished nor failed; one is probably hung"
                )
            time.sleep(POLL_S)

    def step(self, what: str, work: Callable[[], T] | None = None) -> T | None:
        """Run `work` here, then wait until every rank has done its part of this step.

        A failure here is published before it is raised; a failure elsewhere raises PeerFailed.
        """
        try:
            value = work() if work is not None else None
        except BaseException as exc:
            self.publish_failure(exc)
            raise
        if self.distributed:
            base = self._key(what)
            self._store_call(lambda: self.store.set(f"{base}/{self.rank}", b"1"))
            self._wait([f"{base}/{r}" for r in range(self.world_size)], what)
        return value

    def broadcast(self, what: str, make: Callable[[], Any]) -> Any:
        """Rank 0 runs `make`; every rank gets its JSON-serialisable result."""
        key = self._key(what) if self.distributed else ""
        if self.is_main:
            try:
                value = make()
            except BaseException as exc:
                self.publish_failure(exc)
                raise
            if self.distributed:
                self._store_call(lambda: self.store.set(key, json.dumps(value)))
            return value
        self._wait([key], what)
        return json.loads(self._store_call(lambda: self.store.get(key)))

    def gather(self, what: str, make: Callable[[], Any]) -> list[Any]:
        """Every rank runs `make`; every rank gets all the JSON-serialisable results, in rank order."""
        try:
            value = make()
        except BaseException as exc:
            self.publish_failure(exc)
            raise
        if not self.distributed:
            return [value]
        base = self._key(what)
        self._store_call(lambda: self.store.set(f"{base}/{self.rank}", json.dumps(value)))
        keys = [f"{base}/{r}" for r in range(self.world_size)]
        self._wait(keys, what)
        return [json.loads(self._store_call(lambda k=k: self.store.get(k))) for k in keys]

    def close(self) -> None:
        """Leave the job. Rank 0 may host the store, so it waits (briefly) until the others have left."""
        if not self.distributed:
            return
        try:
            self.store.set(f"{self.prefix}left/{self.rank}", b"1")
            if self.is_main:
                keys = [f"{self.prefix}left/{r}" for r in range(1, self.world_size)]
                deadline = time.monotonic() + LEAVE_TIMEOUT_S
                while not self.store.check(keys) and time.monotonic() < deadline:
                    time.sleep(POLL_S)
        except Exception:  # noqa: BLE001 - the others are gone already
            pass
        self.store = None


def init_ranks(timeout_s: float = WAIT_TIMEOUT_S) -> Ranks:
    """Join the job torchrun started (env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted job must not read old keys
    return Ranks(
        rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), store=store,
        prefix=f"geoscout/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/", timeout_s=timeout_s,
    )
