"""Buffer memory as a finite resource, per node and for the whole daemon.

vb2 drivers allocate from memory that can run out: REQBUFS and CREATE_BUFS
then grant fewer buffers than asked, and fail with ENOMEM only when not even
the queue's minimum fits.  On a T31 (64-128 MB, a third of it reserved for
the ISP and the AVPU) a client asking REQBUFS 256 at 1080p must get what
fits, not 32 x 3 MB.  Every queue of every door (capture nodes, each M2M
context) charges the :class:`BufferBudget` of its node.
"""

from __future__ import annotations

import errno
import threading

MiB = 1 << 20


class BufferBudget:
    """Bytes of buffer memory each node, and all nodes together, may hold.

    ``per_node`` / ``total``: limits in bytes, 0 = no limit.  A queue takes
    buffers with :meth:`take` (atomically: two clients cannot both get the
    last megabytes) and gives them back with :meth:`release`.
    """

    def __init__(self, per_node: int = 0, total: int = 0):
        self.per_node = per_node
        self.total = total
        self._lock = threading.Lock()
        self._held: dict[tuple[str, int], int] = {}  # (node, id(queue)) -> bytes

    def take(self, node: str, queue: object, each: int, want: int, least: int) -> int:
        """Reserve up to ``want`` buffers of ``each`` bytes for ``queue`` of ``node``
        (added to what it holds); returns how many.  OSError(ENOMEM) when fewer
        than ``least`` fit."""
        if not (self.per_node or self.total):
            return want
        key = (node, id(queue))
        with self._lock:
            fits = want
            if self.per_node:
                fits = min(fits, max(0, self.per_node - self._node_held(node)) // each)
            if self.total:
                fits = min(fits, max(0, self.total - sum(self._held.values())) // each)
            if fits < least:
                raise OSError(errno.ENOMEM, self._short(node, each, least))
            if fits:
                self._held[key] = self._held.get(key, 0) + fits * each
            return fits

    def release(self, node: str, queue: object) -> None:
        with self._lock:
            self._held.pop((node, id(queue)), None)

    def held(self, node: str | None = None) -> int:
        with self._lock:
            return sum(self._held.values()) if node is None else self._node_held(node)

    def reserve(self) -> int:
        """Address space a node's memfd mapping needs: twice its limit (M2M regions can
        fragment), or 1 GiB without a limit (64-bit hosts; a 32-bit camera has 2 GiB)."""
        return 2 * self.per_node if self.per_node else 1 << 30

    def describe(self) -> str:
        parts = [f"{self.per_node // MiB} MiB per node" if self.per_node else "no per-node limit"]
        if self.total:
            parts.append(f"{self.total // MiB} MiB in all")
        return ", ".join(parts)

    def _short(self, node: str, each: int, least: int) -> str:
        return (f"{least} buffer(s) of {each} bytes do not fit the buffer budget "
                f"({self.describe()}; node {node} holds {self._node_held(node)} bytes, "
                f"all nodes {sum(self._held.values())})")

    def _node_held(self, node: str) -> int:  # with the lock held
        return sum(n for (nd, _), n in self._held.items() if nd == node)


UNLIMITED = BufferBudget()
