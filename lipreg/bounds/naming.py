"""Buffer names for graph nodes, shared by the estimator and SeqLip."""
from __future__ import annotations

import re


def buffer_name(prefix: str, node_name: str, taken: set[str] | None = None) -> str:
    """A valid, readable buffer name for a node (``conv1+bn1`` -> ``power_conv1_bn1``); with ``taken``, made unique
    among it by a suffix (``_2``, ``_3``...) and added to it."""
    base = f"{prefix}_{re.sub(r'[^0-9a-zA-Z_]', '_', node_name)}"
    if taken is None:
        return base
    candidate, i = base, 2
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate
