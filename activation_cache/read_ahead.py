"""Read-ahead: run a producer generator in a background thread, a few items ahead of its consumer.

Disk reads, checksum hashing and dtype conversion release the GIL, so the thread overlaps them
with the consumer's compute. Exceptions raised by the producer are re-raised in the consumer at
the point where the failed item would have arrived; closing the consumer (``break``, garbage
collection) stops the thread at its next item.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


def read_ahead(produce: Callable[[], Iterator[T]], depth: int = 2) -> Iterator[T]:
    """Yield the items of ``produce()``, computed up to ``depth`` items ahead in a thread."""
    if depth <= 0:
        yield from produce()
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in produce():
                while not stop.is_set():
                    try:
                        items.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((True, _DONE))
        except BaseException as exc:  # handed to the consumer
            items.put((False, exc))

    thread = threading.Thread(target=run, name="cache-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
