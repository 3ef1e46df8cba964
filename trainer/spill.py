"""Spill files: where a loss reporter keeps numbered batches that Redis has not taken yet.

A spill file is a sequence of frames, each

    magic b"HBS1" | seq (u64 little-endian) | payload length (u32) | payload (packed records)

appended in seq order. A torn last frame (the process died while writing it) was never
acknowledged to anyone and is dropped on reading.

Files live in a private folder per user and run, `<root>/<run>/r<rank>-<first seq>.spill`:
the root is $HARDBATCH_SPILL_DIR, else `hardbatch-spill-<uid>` in the system temp folder,
created 0700 and refused if another user owns it (a shared temp folder must not let one user
plant or read another's records). One folder per run keeps runs apart (run names may contain
`-`, so a file name prefix could not), and lets `remove_run_spills` clean up a deleted run.

Example:
    >>> folder = spill_folder(None, "demo")                      # doctest: +SKIP
    >>> f = SpillFile(folder / "r0-1.spill", max_bytes=1 << 30)  # doctest: +SKIP
    >>> f.append([(1, b"...")])                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np
from hardbatch.sampler.records import RECORD_DTYPE, RECORD_SIZE

FRAME = struct.Struct("<4sQI")  # magic, seq, payload bytes
MAGIC = b"HBS1"

Frame = tuple[int, bytes]


class SpillError(RuntimeError):
    """A spill file or folder that cannot be used (corrupt, foreign owner, full)."""


class SpillFull(SpillError):
    """Appending would pass the file's byte cap."""


ENV_DIR = "HARDBATCH_SPILL_DIR"


def default_root() -> Path:
    """$HARDBATCH_SPILL_DIR, else a per-user folder in the system temp folder."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    return Path(tempfile.gettempdir()) / f"hardbatch-spill-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    """Creates `path` 0700, or checks an existing one is ours, a real folder, and private."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=False)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise SpillError(f"spill folder {path} is not a directory (a symlink?)")
    if st.st_uid != os.getuid():
        raise SpillError(f"spill folder {path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def spill_folder(root: str | Path | None, run: str) -> Path:
    """The private folder for `run`'s spill files under `root` (default: `default_root()`)."""
    base = Path(root) if root is not None else default_root()
    base.parent.mkdir(parents=True, exist_ok=True)
    return _private_dir(_private_dir(base) / run)


def remove_run_spills(root: str | Path | None, run: str) -> int:
    """Deletes the spill files of `run` under `root`; returns how many there were."""
    folder = (Path(root) if root is not None else default_root()) / run
    if not folder.is_dir():
        return 0
    n = len(list(folder.glob("*.spill")))
    shutil.rmtree(folder, ignore_errors=True)
    return n


def parse_frames(data: bytes) -> list[Frame]:
    """The whole frames in `data`, in file order (a torn last frame is left out)."""
    frames, off = [], 0
    while off + FRAME.size <= len(data):
        magic, seq, nbytes = FRAME.unpack_from(data, off)
        if magic != MAGIC:
            raise SpillError(f"not a spill frame at byte {off}")
        if off + FRAME.size + nbytes > len(data):
            break
        frames.append((seq, data[off + FRAME.size: off + FRAME.size + nbytes]))
        off += FRAME.size + nbytes
    return frames


def read_spill(path: str | Path) -> list[tuple[int, np.ndarray]]:
    """The frames of a spill file as (seq, records), for inspection."""
    return [(seq, np.frombuffer(p, dtype=RECORD_DTYPE)) for seq, p in
            parse_frames(Path(path).read_bytes())]


def take_orphans(folder: Path, rank: int) -> tuple[list[Path], list[Frame]]:
    """Spill files an earlier reporter of this run and rank left in `folder`, and their frames
    sorted by seq (unreadable or corrupt files are skipped)."""
    paths = sorted(folder.glob(f"r{int(rank)}-*.spill"))
    frames: list[Frame] = []
    for path in paths:
        with contextlib.suppress(OSError, SpillError):
            frames += parse_frames(path.read_bytes())
    frames.sort(key=lambda f: f[0])
    return paths, frames


def _size(frames: list[Frame]) -> int:
    return sum(FRAME.size + len(p) for _, p in frames)


class SpillFile:
    """One reporter's spill file: frames appended at the end, sent from `read_offset` on.

    Args:
        path: the file (created on the first append).
        max_bytes: cap on the file size; `append` raises SpillFull past it.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < FRAME.size:
            raise ValueError(f"max_bytes must be >= {FRAME.size}, got {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.read_offset = 0  # offset of the next unsent frame
        self.size = 0
        self.pending_records = 0  # records in unsent frames

    @property
    def has_unsent(self) -> bool:
        return self.read_offset < self.size

    def room(self, frames: list[Frame]) -> bool:
        return self.size + _size(frames) <= self.max_bytes

    def append(self, frames: list[Frame]) -> None:
        if not frames:
            return
        if not self.room(frames):
            raise SpillFull(f"spill file {self.path} would pass its cap of {self.max_bytes} bytes")
        with open(self.path, "ab") as f:
            for seq, payload in frames:
                f.write(FRAME.pack(MAGIC, seq, len(payload)))
                f.write(payload)
        self.size += _size(frames)
        self.pending_records += sum(len(p) // RECORD_SIZE for _, p in frames)

    def read(self, offset: int) -> tuple[int, bytes, int]:
        """(seq, payload, offset of the next frame) of the frame at `offset`."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            head = f.read(FRAME.size)
            magic, seq, nbytes = FRAME.unpack(head) if len(head) == FRAME.size else (b"", 0, 0)
            if magic != MAGIC:
                raise SpillError(f"corrupt spill file {self.path} at byte {offset}")
            payload = f.read(nbytes)
        return seq, payload, offset + FRAME.size + nbytes

    def unsent(self) -> list[Frame]:
        frames, off = [], self.read_offset
        while off < self.size:
            seq, payload, off = self.read(off)
            frames.append((seq, payload))
        return frames

    def sent(self, next_offset: int, records: int) -> None:
        """The frame before `next_offset` was delivered; a drained file starts afresh."""
        self.read_offset = next_offset
        self.pending_records -= records
        if self.read_offset >= self.size:
            self.path.unlink(missing_ok=True)
            self.read_offset = self.size = self.pending_records = 0

    def rewrite(self, frames: list[Frame]) -> None:
        """Replaces the file by `frames` (all unsent), durably: a crash leaves old or new."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for seq, payload in frames:
                f.write(FRAME.pack(MAGIC, seq, len(payload)))
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self.read_offset = 0
        self.size = _size(frames)
        self.pending_records = sum(len(p) // RECORD_SIZE for _, p in frames)
