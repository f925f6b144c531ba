"""The content of one checkpoint file: bytes, or a file produced on demand (written or rendered once)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class LazyFile:
    """A checkpoint file produced on demand: ``write(path)`` writes it straight to a local file (no in-memory
    copy of a large tensor file), ``render()`` returns its bytes (for object stores).

    Attributes:
        write: writes the file to the local path it is given.
        render: returns the file's bytes.
    """

    write: Callable[[str], None]
    render: Callable[[], bytes]


#: The content of one file of a checkpoint.
FileContent = bytes | memoryview | LazyFile
#: The verified bytes of a file read back: ``bytes``, or a writable ``memoryview`` of an uninitialised buffer
#: (a local file, read without the zero-filling and copying of ``bytes``), whose tensors are decoded without a copy.
ReadBytes = bytes | memoryview
