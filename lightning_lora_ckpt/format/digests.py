"""The digests a manifest lists for each file: BLAKE3 (what new checkpoints record: multi-threaded, several times
sha256's speed) or sha256 (what checkpoints written before 0.2 record, and still load with).

Either is a 256-bit cryptographic hash: a file that matches its manifest entry is the file that was written,
byte for byte, whether it was damaged by a disk, a network or a truncated upload, or swapped on purpose. The
manifest itself is not signed: whoever can rewrite ``checkpoint.json`` can make it describe other files (see
docs/format.md).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, cast

import blake3

Algorithm = Literal["blake3", "sha256"]
#: The algorithms a manifest entry may name, the first being what new checkpoints record.
ALGORITHMS: tuple[Algorithm, ...] = ("blake3", "sha256")
DEFAULT_ALGORITHM: Algorithm = "blake3"
#: Both digests are 256 bits, written as 64 lowercase hex digits.
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20
_max_threads = blake3.blake3.AUTO


def _hash_on_one_thread() -> None:
    # BLAKE3's worker threads (a global pool) do not survive fork: a forked child that used them would wait for
    # threads it does not have, forever.
    global _max_threads
    _max_threads = 1


os.register_at_fork(after_in_child=_hash_on_one_thread)


def new_hasher(algorithm: Algorithm = DEFAULT_ALGORITHM) -> Any:
    """An incremental hasher (``update(bytes)``, ``hexdigest()``); BLAKE3 hashes large inputs on every core.

    Args:
        algorithm: ``"blake3"`` or ``"sha256"``.

    Returns:
        The hasher.

    Raises:
        ValueError: an unknown algorithm.
    """
    if algorithm == "blake3":
        return blake3.blake3(max_threads=_max_threads)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


def digest_hex(data: bytes | memoryview, algorithm: Algorithm = DEFAULT_ALGORITHM) -> str:
    """The digest of ``data`` as a manifest lists it.

    Args:
        data: the bytes to hash.
        algorithm: ``"blake3"`` or ``"sha256"``.

    Returns:
        64 lowercase hex digits.
    """
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return str(hasher.hexdigest())


def file_digest(path: str | os.PathLike[str], algorithm: Algorithm = DEFAULT_ALGORITHM) -> tuple[int, str]:
    """The size and digest of a local file, read in chunks, each hashed while the next is read (not mapped: the
    file's pages are not counted in the process's memory).

    Args:
        path: the file.
        algorithm: ``"blake3"`` or ``"sha256"``.

    Returns:
        (size in bytes, 64 lowercase hex digits).
    """
    hasher = new_hasher(algorithm)
    with open(path, "rb", buffering=0) as f:
        # Two buffers in turn: one is filled while the other is hashed.
        size = _read_hashing(f, hasher, itertools.cycle([memoryview(bytearray(_CHUNK)) for _ in range(2)]))
    return size, str(hasher.hexdigest())


def read_with_digest(
    path: str | os.PathLike[str], limit: int, algorithm: Algorithm = DEFAULT_ALGORITHM
) -> tuple[memoryview, str]:
    """At most ``limit + 1`` bytes of a local file, in a writable buffer, and their digest: each chunk is hashed
    in a second thread while the next one is read, so verifying costs about as much as reading. The buffer is
    not zero-filled first (``bytes`` and ``bytearray`` are: a second pass over the memory).

    Args:
        path: the file.
        limit: the most bytes wanted (one more is read, so a longer file shows as longer).
        algorithm: ``"blake3"`` or ``"sha256"``.

    Returns:
        (the bytes read, their digest).
    """
    import torch  # here, not at import: the management commands start without torch

    hasher = new_hasher(algorithm)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(
            cast(Any, torch.empty(min(os.fstat(f.fileno()).st_size, limit + 1), dtype=torch.uint8).numpy())
        )
        done = _read_hashing(f, hasher, (view[start : start + _CHUNK] for start in range(0, len(view), _CHUNK)))
    return view[:done], str(hasher.hexdigest())  # shorter if the file shrank since its size was read


def _read_hashing(f: Any, hasher: Any, windows: Iterator[memoryview]) -> int:
    """Read ``f`` into each window in turn until it ends, hashing each filled window in a second thread while the
    next one is read; the number of bytes read."""
    done, hashing = 0, None
    with ThreadPoolExecutor(1, thread_name_prefix="lora-ckpt-hash") as pool:
        for window in windows:
            n = f.readinto(window)
            if hashing is not None:
                hashing.result()  # in order, and before the buffer it hashes is filled again
                hashing = None
            if not n:
                break
            hashing = pool.submit(hasher.update, window[:n])
            done += n
        if hashing is not None:
            hashing.result()
    return done
