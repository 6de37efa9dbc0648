"""The attention dataset: one typed object for everything the attention stage knows about a set of images.

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

The attention pass streams batches (:func:`attention_batches`); :class:`AttentionShards` keeps its finished
slices on disk as it goes, so a killed pass continues from the last complete shard instead of the start.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write
from pipeline.core.run import reading
from pipeline.model.cam import AttentionBatch, AttentionExtractor, upsample_cams

log = logging.getLogger(__name__)
SPACES = ("vectors", "embedding")
REPRESENTATION_ROWS = 8192  # rows normalised at a time: 64 MB of temporaries at 2 x 2,048-d
UNIT_EPS = 1e-12  # guards the division for an all-zero vector (a CAM that is zero everywhere)
SHARD_IMAGES = 512  # most work a kill can cost: ~1 s of a GPU's ResNet-50 pass, ~12 MB of its vectors
MIN_SHARDS = 8  # and at most an eighth of a small pass, so a short one resumes too
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


def attention_vectors(batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model looked at (f) and what it ignored (f_rev), from activations and [0, 1] maps.

    ``f = mean_ij A[:, i, j] * m[i, j]`` (SLIM sums; the mean only rescales by the constant h*w) and
    ``f_rev = mean(A * (1 - m)) = mean(A) - f``: one product over the activations instead of two.
    """
    attended = torch.einsum("bkhw,bhw->bk", batch.activations, batch.cams) / batch.cams[0].numel()
    return attended, batch.features - attended


def aiou(full_cams: torch.Tensor, masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of high attention (CAM >= threshold) that lies on the object: 1.0 = all of it."""
    hot = full_cams * (full_cams >= threshold)
    total = hot.flatten(1).sum(1)
    inside = (hot * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)


def compute_attention(extractor: AttentionExtractor, loader: DataLoader, device: torch.device, threshold: float,
                      image_size: int, progress: bool = True) -> AttentionArrays:
    """Stream ``loader`` through ``extractor``: one row per image, in loader order.

    Memory holds only the per-image vectors and low-resolution maps, allocated once from the first batch's
    shapes; full-resolution maps (for AIoU) live one batch at a time.
    """
    return stack_rows(attention_batches(extractor, loader, device, threshold, image_size, progress),
                      len(loader.dataset))


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


def attention_batches(extractor: AttentionExtractor, loader: DataLoader, device: torch.device, threshold: float,
                      image_size: int, progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The per-image values of each batch of ``loader`` (the fields of :class:`AttentionArrays`), in order."""
    for images, labels, index, masks in tqdm(loader, desc="embed", disable=not progress, unit="batch"):
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        batch = extractor(images, labels)
        attended, ignored = attention_vectors(batch)
        probs = torch.softmax(batch.logits, dim=1)
        values = {
            "index": index.numpy(),
            "y": labels.cpu().numpy(),
            "pred": probs.argmax(1).cpu().numpy(),
            "confidence": probs.max(1).values.cpu().numpy(),
            "entropy": entropy(probs).cpu().numpy(),
            "features": batch.features.cpu().numpy(),
            "f_att": attended.cpu().numpy(),
            "f_rev": ignored.cpu().numpy(),
            "cam": batch.cams.cpu().numpy().astype(np.float16),
        }
        if masks.numel():
            full = upsample_cams(batch.cams, image_size)
            values["aiou"] = aiou(full, masks.to(device).float(), threshold).cpu().numpy()
        yield values


def shard_rows(n_images: int, batch_size: int) -> int:
    """Images per shard: a whole number of batches, so a resumed pass sees exactly the batches (and the float
    rounding) of an undisturbed one; about ``SHARD_IMAGES``, fewer for a pass under ``MIN_SHARDS`` of those."""
    wanted = min(SHARD_IMAGES, math.ceil(n_images / MIN_SHARDS))
    return batch_size * max(1, wanted // batch_size)


@dataclass(frozen=True)
class AttentionShards:
    """The finished slices of one attention pass: ``FOLDER/KEY-00000.npz``, ``rows`` images each, in order.

    ``key`` is the pass's fingerprint (model bytes, data, settings, device): shards of another pass are never
    read. Each shard is an ``.npz`` of the per-image fields of its rows, written atomically, so a killed pass
    leaves whole shards only; one that does not read back is discarded and recomputed. Members are stored
    uncompressed (``np.savez``), so a shard's arrays can also be memory-mapped where they lie.
    """

    folder: Path
    key: str
    rows: int

    def path(self, shard: int) -> Path:
        return self.folder / f"{self.key}-{shard:05d}.npz"

    def remove_stale(self) -> None:
        """Delete shards of other passes (older models or settings): they can never be resumed."""
        for path in self.folder.glob("*.npz"):
            if not path.name.startswith(f"{self.key}-"):
                path.unlink(missing_ok=True)

    def first_missing(self, index: np.ndarray, first: int = 0, stop: int | None = None) -> int:
        """The number of the first shard from ``first`` (up to ``stop``) that is absent or not whole: whole
        ones are complete and hold exactly the expected image ids (``index``, in pass order).

        Each is read in full (the zip's checksums catch a torn one) and dropped again: memory holds one shard.
        The first one that is not whole is deleted; ``first``/``stop`` keep a rank to its own shards.
        """
        shard = first
        while (stop is None or shard < stop) and self.path(shard).exists():
            expected = index[shard * self.rows:(shard + 1) * self.rows]
            try:
                part = self.load(shard)
                whole = np.array_equal(part["index"], expected) and all(len(v) == len(expected)
                                                                         for v in part.values())
            except Exception as exc:  # noqa: BLE001 - a torn file fails in zipfile, zlib or numpy alike; a cache
                log.warning("discarding the unreadable attention shard %s (%s); recomputing it",
                            self.path(shard), exc.__class__.__name__)
                whole = False
            if not whole:
                self.path(shard).unlink(missing_ok=True)
                break
            shard += 1
        return shard

    def load(self, shard: int) -> dict[str, np.ndarray]:
        """One shard's fields; raises on a torn file (:meth:`completed` has checked the ones it counts)."""
        with np.load(self.path(shard), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}

    def column(self, count: int, key: str) -> Iterator[np.ndarray]:
        """Field ``key`` of the first ``count`` shards, one shard at a time (only that member is read)."""
        for shard in range(count):
            with np.load(self.path(shard), allow_pickle=False) as npz:
                yield npz[key]

    def write(self, batches: Iterable[dict[str, np.ndarray]], first: int) -> int:
        """Group ``batches`` into shards numbered from ``first``, saving each as it completes; returns the number
        of shards there are now."""
        pending: list[dict[str, np.ndarray]] = []
        shard = first
        for values in batches:
            pending.append(values)
            if sum(len(p["index"]) for p in pending) >= self.rows:
                self._save(shard, pending)
                shard, pending = shard + 1, []
        if pending:
            self._save(shard, pending)
            shard += 1
        return shard

    def _save(self, shard: int, batches: list[dict[str, np.ndarray]]) -> None:
        part = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
        atomic_write(self.path(shard), lambda handle: np.savez(handle, **part))
