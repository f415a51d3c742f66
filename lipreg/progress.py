"""Optional progress bars for long computations (``converge(progress=True)``, ``certified_bound(progress=True)``):
a ``tqdm`` bar over the operators, on stderr; without ``tqdm`` installed, or when off, the plain iterable."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], enabled: bool, desc: str) -> Iterator[T]:
    """``items``, with a progress bar titled ``desc`` when ``enabled`` (one tick per item)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            items = list(items)
            yield from tqdm(items, desc=desc, total=len(items), unit="op", leave=False)
            return
    yield from items
