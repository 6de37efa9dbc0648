"""Atomic file writes: a command killed half-way leaves either the old file or the new one, never a torn one.

Every write goes to a uniquely named temporary file in the target's directory, is fsynced, and is renamed into
place (``os.replace`` is atomic on POSIX and Windows). The temporary file is created with mode 0666 and the
kernel applies the process umask itself, so artifacts get the usual permissions without reading or changing
the umask (changing it is process-wide and races with other threads, e.g. in the ML backend).

A full disk (or a quota, or a file-size limit) while writing is the one-line :class:`PipelineError`; the
previous file stays as it was and the temporary file is removed.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.core.errors import PipelineError

# what a full disk looks like: no space, a file over the size limit (RLIMIT_FSIZE, `ulimit -f`), a quota
NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
TEMP_SUFFIX = ".tmp"  # a write's temporary file: ``.NAME.RANDOM.tmp`` beside its target
DIGEST_CHUNK = 1 << 20  # read files to hash in 1 MiB pieces: constant memory for a model of any size


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(fileobj)`` on a temp file, fsync it, then rename it into place.

    Running out of space is the one-line error, whoever raised it (``torch.save`` reports the ``OSError`` of
    its write callback as a ``RuntimeError`` with the ``OSError`` as its context).
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    with no_space_is_an_error(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextmanager
def no_space_is_an_error(path: Path) -> Iterator[None]:
    """A full disk while writing ``path`` (a file, or files below a folder) becomes the one-line error."""
    try:
        yield
    except BaseException as exc:
        full = _no_space(exc)
        if full is not None:
            raise PipelineError(f"no space left on device while writing {path} ({errno.errorcode[full]}); "
                                "free space and re-run") from exc
        raise


def _no_space(exc: BaseException | None) -> int | None:
    """The errno of a full disk anywhere in ``exc``'s chain of causes, else ``None``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())


def read_json(path: Path, remedy: str = "delete it and re-run the stage") -> Any:
    """Parsed JSON; a torn or binary file is the one-line error with ``remedy`` (what the user should do)."""
    try:
        return json.loads(path.read_bytes().decode())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc.msg}); {remedy}") from exc
    except UnicodeDecodeError:
        raise PipelineError(f"{path} is not valid JSON (not UTF-8 text); {remedy}") from None


def file_digest(path: Path) -> str:
    """A short content hash of a file: tells a cache which exact input (e.g. model weights) it was made from."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(DIGEST_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
