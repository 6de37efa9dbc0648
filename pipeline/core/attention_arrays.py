"""The attention dataset on disk: one typed object for everything the attention stage knows about a set of images.

:class:`AttentionArrays` is what ``embed`` writes (``attention.npz``) and what every later stage, the ML backend
and the benchmarks read: per image its id, class, prediction, the attention vectors ``f`` (what the model
looked at) and ``f_rev`` (what it ignored), pooled features, the low-resolution CAM, AIoU where masks exist and
a 2-D embedding. Rows are addressed by image id through :meth:`AttentionArrays.row_of`, and the representation
that clustering, propagation and nearest-neighbour look-ups compare is defined once, in
:func:`representation_of`: a backend placing an unseen image and a stage clustering the training set cannot
drift into different spaces.

Users only index the fields as arrays: :meth:`AttentionArrays.load` memory-maps the large ones where they lie in
``attention.npz`` (members are stored uncompressed), so a stage reads the rows it touches, class by class, not
the whole file; :func:`save_streamed` writes the file from the pass's shards one field at a time, so neither
side holds every row in RAM.

This module needs numpy only, never torch: the stages that only read the file (sample's selection, propagate,
curate, the weights) then run without torch's ~0.5 GB of libraries in their resident memory and its seconds of
start-up. The pass that computes the arrays is :mod:`pipeline.model.attention`.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from sklearn.preprocessing import StandardScaler

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write
from pipeline.core.run import reading

SPACES = ("vectors", "embedding")
REPRESENTATION_ROWS = 8192  # rows normalised at a time: 64 MB of temporaries at 2 x 2,048-d
UNIT_EPS = 1e-12  # guards the division for an all-zero vector (a CAM that is zero everywhere)
MAP_MIN_BYTES = 1 << 20  # members this large are memory-mapped; smaller ones (names, ids of a tiny run) are read
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip member's local header: 30 bytes, then name and extra field


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), UNIT_EPS)


def representation_of(attended: np.ndarray, ignored: np.ndarray,
                      rows: np.ndarray | slice | None = None) -> np.ndarray:
    """The attention representation: unit-length ``f`` and ``f_rev`` side by side, of ``rows`` only if given.

    Unit length keeps the two halves equally weighted whatever the activation scale of the backbone. Rows are
    read (from memory-mapped arrays: from disk) and written into the result ``REPRESENTATION_ROWS`` at a time,
    so memory holds the result and one chunk, not copies of each half (4.6 GB more for a 140,000-image class
    at 2 x 2,048-d).
    """
    index = np.arange(len(attended)) if rows is None else np.arange(len(attended))[rows]
    width = attended.shape[1]
    dtype = np.result_type(unit_rows(attended[:1]), unit_rows(ignored[:1]))
    out = np.empty((len(index), width + ignored.shape[1]), dtype=dtype)
    for start in range(0, len(index), REPRESENTATION_ROWS):
        chunk = slice(start, start + REPRESENTATION_ROWS)
        out[chunk, :width] = unit_rows(attended[index[chunk]])
        out[chunk, width:] = unit_rows(ignored[index[chunk]])
        release_pages(attended)
        release_pages(ignored)
    return out


def read_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]``, read ``REPRESENTATION_ROWS`` at a time from a memory-mapped array with its file's pages
    released after each chunk: resident memory then holds the copy, not the copy plus every page it touched
    (a class's rows are spread over the whole file, 2.3 GB of pages for CelebA's large class)."""
    out = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
    for start in range(0, len(rows), REPRESENTATION_ROWS):
        chunk = slice(start, start + REPRESENTATION_ROWS)
        out[chunk] = values[rows[chunk]]
        release_pages(values)
    return out


def release_pages(values: np.ndarray) -> None:
    """Drop the pages a memory-mapped array has read from this process's resident set (no-op otherwise).

    They stay in the page cache, so reading them again costs no disk; but a stage that sweeps a 10 GB file class
    by class would otherwise count every page it ever touched in its resident memory (``MADV_DONTNEED`` on a
    read-only file mapping discards nothing that is not on disk).
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    base = values
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if advice is not None and base is not None:
        base.madvise(advice)


@dataclass(frozen=True, eq=False)
class AttentionArrays:
    """Per-image attention data, one row per image (the order the attention stage streamed them in)."""

    index: np.ndarray  # (N,) image ids in the dataset
    y: np.ndarray  # (N,) class the CAM was taken for (the true class)
    pred: np.ndarray  # (N,) predicted class
    confidence: np.ndarray  # (N,) probability of the prediction
    entropy: np.ndarray  # (N,) entropy of the predicted distribution
    features: np.ndarray  # (N, K) pooled activations: what the linear head sees
    f_att: np.ndarray  # (N, K) attention-weighted activations: what the model looked at
    f_rev: np.ndarray  # (N, K) reverse-weighted activations: what it ignored
    cam: np.ndarray  # (N, h, w) float16 CAM at the activation grid, in [0, 1]
    aiou: np.ndarray | None = None  # (N,) share of strong attention on the object, where masks exist
    emb_att: np.ndarray | None = None  # (N, 2) embedding of f, for clustering in 2-D and for plots
    emb_rev: np.ndarray | None = None  # (N, 2) embedding of f_rev
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.index)

    # --- rows -------------------------------------------------------------------------------------------
    @cached_property
    def _rows(self) -> dict[int, int]:
        return {int(image_id): row for row, image_id in enumerate(self.index)}

    def has_image(self, image_id: int) -> bool:
        return int(image_id) in self._rows

    def row_of(self, image_id: int) -> int:
        """The row of ``image_id``; a clear error for an image the attention stage never saw."""
        try:
            return self._rows[int(image_id)]
        except KeyError:
            raise PipelineError(f"image {image_id} is not in this run's attention data; re-run `embed` if the "
                                "dataset changed") from None

    def rows_of(self, image_ids) -> np.ndarray:
        return np.array([self.row_of(i) for i in image_ids], dtype=int)

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.y)

    def for_class(self, y: int) -> np.ndarray:
        """Rows of class ``y``, in row order."""
        return np.flatnonzero(self.y == y)

    # --- representation ---------------------------------------------------------------------------------
    def representation(self, space: str = "vectors", rows: np.ndarray | None = None) -> np.ndarray:
        """Rows to cluster and compare: :func:`representation_of`, or the standardised 2-D embeddings; of
        ``rows`` only (e.g. one class: all a stage needs in memory at a time), or of every row.

        The embeddings are standardised over every row, so a class's points are on the same scale whether read
        alone or with the rest.
        """
        if space == "embedding":
            if self.emb_att is None or self.emb_rev is None:
                raise PipelineError("this attention data has no 2-D embedding; re-run `embed`")
            selected = slice(None) if rows is None else rows
            return StandardScaler().fit(np.hstack([self.emb_att, self.emb_rev])).transform(
                np.hstack([self.emb_att[selected], self.emb_rev[selected]]))
        if space != "vectors":
            raise PipelineError(f"unknown space {space!r}; choose {' or '.join(SPACES)}")
        return representation_of(self.f_att, self.f_rev, rows)

    def representation_rows(self, space: str, rows: np.ndarray) -> RepresentationRows:
        """:meth:`representation` of ``rows``, built when indexed rather than now (see :class:`RepresentationRows`)."""
        self.representation(space, rows[:1])  # an unknown space or a missing embedding fails here, as it does there
        return RepresentationRows(self, space, rows)

    # --- files ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> AttentionArrays:
        """``attention.npz``, its large fields memory-mapped; a torn file is the one-line error saying to re-run
        ``embed``."""
        with reading(path):
            fields = {f.name for f in dataclasses.fields(cls)}
            values = {key: value for key, value in mapped_npz(path).items() if key in fields}
            values["class_names"] = tuple(str(c) for c in values.get("class_names", ()))
            return cls(**values)



class RepresentationRows:
    """Rows of :meth:`AttentionArrays.representation`, built when indexed, never all at once unless asked.

    ``points[i]`` (a slice or an array of positions) builds those rows from the mapped file; ``np.asarray(points)``
    builds them all. The projections a large class goes through (:func:`pipeline.slim.clustering.principal_axes`)
    index it chunk by chunk, so a 140,000-image class at 2 x 2,048-d never holds its 2.3 GB representation; each
    row is built exactly as :meth:`AttentionArrays.representation` builds it, so results are the same to the bit.
    """

    def __init__(self, arrays: AttentionArrays, space: str, rows: np.ndarray) -> None:
        self.arrays, self.space, self.rows = arrays, space, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        arrays = self.arrays
        halves = (arrays.emb_att, arrays.emb_rev) if self.space == "embedding" else (arrays.f_att, arrays.f_rev)
        width = sum(half.shape[1] for half in halves)
        return len(self.rows), width

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __getitem__(self, positions: np.ndarray | slice) -> np.ndarray:
        return self.arrays.representation(self.space, self.rows[positions])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.arrays.representation(self.space, self.rows)
        return whole if dtype is None else whole.astype(dtype)


def mapped_npz(path: Path) -> dict[str, np.ndarray]:
    """The members of an ``.npz``: large uncompressed ones as read-only memory maps of the file, the rest read.

    ``np.load`` cannot map a member of a zip; but ``np.savez`` stores members uncompressed, so each ``.npy``
    lies in the file as it would alone, after the zip's local header: map it there.
    """
    values: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, path.open("rb") as raw, np.load(path, allow_pickle=False) as npz:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            mapped = _mapped_member(path, raw, info) if info.compress_type == zipfile.ZIP_STORED \
                and info.file_size >= MAP_MIN_BYTES else None
            values[key] = npz[key] if mapped is None else mapped
    return values


def _mapped_member(path: Path, raw, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A memory map of one stored ``.npy`` member, or None for a layout it does not map (read it instead)."""
    raw.seek(info.header_offset)
    header = ZIP_LOCAL_HEADER.unpack(raw.read(ZIP_LOCAL_HEADER.size))
    raw.seek(info.header_offset + ZIP_LOCAL_HEADER.size + header[-2] + header[-1])  # past the name and extra
    version = np.lib.format.read_magic(raw)
    if version not in ((1, 0), (2, 0)):
        return None
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(raw)
    if dtype.hasobject or 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order="F" if fortran else "C")


def save_streamed(path: Path, column: Callable[[str], Iterable[np.ndarray]], template: dict[str, np.ndarray],
                  rows: int, whole: dict[str, np.ndarray]) -> None:
    """Write ``attention.npz`` atomically from consecutive parts (the pass's shards), one field at a time.

    ``column(key)`` yields that field of each part in order, so memory holds one part's field, whatever the
    number of rows; ``template`` (any one part) gives the fields and their types; ``whole`` holds the small
    arrays computed over all rows (class names, 2-D embeddings). Members are stored uncompressed, as
    ``np.savez`` stores them, so :func:`mapped_npz` can map them.
    """

    def write(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, sample in template.items():
                header = {"descr": np.lib.format.dtype_to_descr(sample.dtype), "fortran_order": False,
                          "shape": (rows, *sample.shape[1:])}
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, header)
                    written = 0
                    for values in column(key):
                        member.write(np.ascontiguousarray(values, dtype=sample.dtype).tobytes())
                        written += len(values)
                    if written != rows:
                        raise PipelineError(f"attention parts hold {written} rows of {key}, expected {rows}")
            for key, value in whole.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    atomic_write(path, write)


def stack_rows(parts: Iterable[dict[str, np.ndarray]], n: int) -> AttentionArrays:
    """``n`` rows from consecutive parts (batches or shards), into arrays allocated once from the first part."""
    out: dict[str, np.ndarray] = {}
    row = 0
    for values in parts:
        if not out:
            out = {key: np.empty((n, *v.shape[1:]), dtype=v.dtype) for key, v in values.items()}
        for key, value in values.items():
            out[key][row:row + len(value)] = value
        row += len(values["index"])
    return AttentionArrays(**out)
