"""Named types for shapes of data that recur across modules."""

from __future__ import annotations

from collections.abc import Callable

# progress(done, total, what): called by long steps so a front end can show a bar.
ProgressFn = Callable[[int, int, str], None]
# An input size, batch first: (1, 3, 224, 224).
Shape = tuple[int, ...]
