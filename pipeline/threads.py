"""Running blocking work where Ctrl-C cannot wedge it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def off_main_thread(produce: Callable[[], Iterator[T]]) -> Iterator[T]:
    """Yield what ``produce()`` yields; on the main thread, run it on a daemon thread.

    Python raises ``KeyboardInterrupt`` (Ctrl-C; SIGTERM in the CLI) in the main thread
    between any two bytecodes, including inside the HTTP stack right after it took one of
    its locks, which then stays held and hangs the clean-up that follows. Waiting here, on
    a queue, the interruption lands in this function instead; the request is left to the
    daemon thread, which dies with the process. The wait wakes every 0.1 s: a signal
    whose handler ran just before it blocked (after the interpreter last checked for
    signals) would otherwise be raised only when the request ends. Off the main thread
    (a batch's workers), ``produce()`` runs in place.

    Raises:
        whatever ``produce()`` raises, re-raised on the calling thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield from produce()
        return
    items: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def work() -> None:
        try:
            for item in produce():
                items.put((True, item))
        except BaseException as e:  # handed to the caller
            items.put((False, e))
        else:
            items.put((False, None))

    threading.Thread(target=work, name="pipeline-request", daemon=True).start()
    while True:
        try:
            more, item = items.get(timeout=0.1)
        except queue.Empty:
            continue  # a pending KeyboardInterrupt is raised here, at the loop's jump back
        if more:
            yield item
        elif item is None:
            return
        else:
            raise item
