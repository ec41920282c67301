"""Labelled image sets named by a spec string, and their stratified train / val / test split.

Specs (the same strings in the CLI, the app and the API):

* ``demo`` — scikit-learn's bundled handwritten digits (8x8, 10 classes; real data, offline).
* ``tiny-imagenet:PATH`` — the official tiny-imagenet-200 layout; train and val images are pooled.
* ``folder:PATH`` — one sub-folder per class (ImageFolder); images of any size are resized.
* ``fashion-mnist:PATH`` — the gzipped IDX files (Debian: ``/usr/share/datasets/fashion-mnist``).

Every sample keeps a stable id (its path relative to the dataset root, or ``<part>:<index>`` for array
datasets), its display image (uint8 RGB at the model size) and gives its normalised tensor on demand.
"""

from __future__ import annotations

import difflib
import gzip
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import InfluenceLensError
from .storage import atomic_write_json, read_json, stable_hash

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_IMAGE_SIZE = {"demo": 32, "fashion-mnist": 32, "tiny-imagenet": 64, "folder": 64}
MIN_IMAGE_SIZE = 8  # ResNet18 halves the image 5 times; below 8 px its deeper layers see a single pixel
BAD_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error we report, not a grey half-image


@dataclass
class ImageSet:
    """A labelled image collection.

    ``images``: (n, S, S, 3) uint8 RGB display images at the model size ``S``; ``labels``: (n,) int64
    indices into ``classes`` (human-readable names); ``class_keys`` are the names on disk (wnids, folders).
    ``skipped`` lists ``(id, reason)`` for files that could not be read.
    """

    spec: str
    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    class_keys: list[str]
    images: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self, index: np.ndarray | slice | None = None) -> torch.Tensor:
        """Normalised model inputs, (k, 3, S, S) float32 (ImageNet mean/std)."""
        return normalise(self.images if index is None else self.images[index])

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(
            self.spec,
            [self.ids[i] for i in index],
            self.labels[index],
            self.classes,
            self.class_keys,
            self.images[index],
            self.skipped,
        )


class ImageView:
    """Lazy rows of a uint8 image array: ``view[rows] -> (k, S, S, 3)`` uint8 RGB, ``len(view)``, ``view.shape``.

    ``images`` is the whole dataset's ``(n, S, S, 3)`` uint8 array (in memory, or memory-mapped from the image
    cache) and ``positions`` ``(k,)`` int64 the rows this view shows, in order; nothing is copied until indexed.
    Pickling keeps a memory-mapped array's file name, not its pixels (Dask workers reopen it).
    """

    def __init__(self, images: np.ndarray, positions: np.ndarray | None = None):
        self.images = images
        self.positions = np.arange(len(images)) if positions is None else np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions), *self.images.shape[1:])

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        pos = self.positions[rows]
        if np.ndim(pos) == 0:
            return np.asarray(self.images[int(pos)])
        order = np.argsort(pos, kind="stable")  # sorted reads from a memory map, then back to the asked order
        out = np.empty((len(pos), *self.images.shape[1:]), dtype=np.uint8)
        out[order] = self.images[pos[order]]
        return out

    def view(self, rows) -> ImageView:
        """A view of a subset of this one's rows (no pixels read)."""
        return type(self)(self.images, self.positions[rows])

    def __getstate__(self) -> dict:
        if isinstance(self.images, np.memmap) and self.images.filename:
            return {"file": self.images.filename, "positions": self.positions}
        return {"images": self.images, "positions": self.positions}

    def __setstate__(self, state: dict) -> None:
        self.images = np.load(state["file"], mmap_mode="r") if "file" in state else state["images"]
        self.positions = state["positions"]


class ModelInputs:
    """Rows of an image array as normalised model inputs: ``x[rows] -> (k, 3, S, S)`` float32 (ImageNet mean/std),
    ``len(x)``, ``x.shape``: the lazy image source the engine and training read batch by batch. ``pixels`` is the
    :class:`ImageView` it reads (and pickles) through. Memory: the rows asked for, nothing more."""

    def __init__(self, images: np.ndarray, positions: np.ndarray | None = None):
        self.pixels = ImageView(images, positions)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        n, s, _, c = self.pixels.shape
        return (n, c, s, s)

    def __getitem__(self, rows) -> torch.Tensor:
        return normalise(self.pixels[rows])


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``(k, S, S, 3)`` (or one ``(S, S, 3)``) → float32 ``(k, 3, S, S)`` with ImageNet mean/std."""
    x = (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


@dataclass(frozen=True)
class Split:
    """Positions into an :class:`ImageSet` for each part: (k,) int64 arrays, sorted."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def parse_spec(spec: str) -> tuple[str, str]:
    """``"tiny-imagenet:PATH"`` → ``("tiny-imagenet", "PATH")``; ``"demo"`` → ``("demo", "")``."""
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DEFAULT_IMAGE_SIZE:
        raise InfluenceLensError(
            f"Unknown dataset spec {spec!r}.",
            "use demo, tiny-imagenet:PATH, folder:PATH or fashion-mnist:PATH",
        )
    if kind in ("tiny-imagenet", "folder") and not path:
        raise InfluenceLensError(f"The dataset spec {spec!r} needs a path.", f"write it as {kind}:/path/to/data")
    return kind, path


def load_dataset(
    spec: str, classes: list[str] | None = None, image_size: int | None = None, on_bad_image: str = "skip"
) -> ImageSet:
    """Load the dataset named by ``spec``, keeping only ``classes`` (names, keys or indices; all if None).

    ``on_bad_image``: ``"skip"`` drops unreadable files (listed in ``ImageSet.skipped``), ``"error"`` stops.
    """
    kind, path = parse_spec(spec)
    check_image_size(image_size)
    size = image_size or DEFAULT_IMAGE_SIZE[kind]
    if on_bad_image not in ("skip", "error"):
        raise InfluenceLensError(f"on_bad_image must be 'skip' or 'error', not {on_bad_image!r}.")
    if kind == "demo":
        return _load_digits(spec, classes, size)
    if kind == "fashion-mnist":
        return _load_fashion_mnist(spec, Path(path or DEFAULT_FASHION_MNIST), classes, size)
    root = _existing_dir(Path(path), kind)
    if kind == "tiny-imagenet":
        keys, names, files = _tiny_imagenet_files(root, classes)
    else:
        keys, names, files = _folder_files(root, classes)
    return _read_images(spec, root, keys, names, files, size, on_bad_image)


def available_classes(spec: str) -> list[tuple[str, str]]:
    """``(key, name)`` of every class the dataset offers, for pickers in the app."""
    kind, path = parse_spec(spec)
    if kind == "demo":
        return [(str(d), str(d)) for d in range(10)]
    if kind == "fashion-mnist":
        return [(str(i), n) for i, n in enumerate(FASHION_MNIST_CLASSES)]
    root = _existing_dir(Path(path), kind)
    if kind == "tiny-imagenet":
        wnids, words = _tiny_imagenet_index(root)
        return [(w, words.get(w, w)) for w in wnids if (root / "train" / w / "images").is_dir()]
    return [(d.name, d.name) for d in _class_dirs(root)]


def check_image_size(image_size: int | None) -> None:
    """``None`` (the dataset's default) or a side of at least :data:`MIN_IMAGE_SIZE` pixels."""
    if image_size is not None and not image_size >= MIN_IMAGE_SIZE:
        raise InfluenceLensError(
            f"Image size {image_size} is too small: the side must be at least {MIN_IMAGE_SIZE} pixels.",
            "leave it out for the dataset's default (32 or 64)",
        )


def check_split(fractions: tuple[float, ...] | str, downsample: float = 1.0) -> None:
    """Three positive split fractions summing to 1 (or ``"official"``), and a downsampling ratio in (0, 1]."""
    if isinstance(fractions, str):
        if fractions != "official":
            raise InfluenceLensError(f"Unknown split {fractions!r}.", "use three fractions or 'official'")
    elif len(fractions) != 3 or not all(f > 0 for f in fractions) or not abs(sum(fractions) - 1) <= 1e-6:
        raise InfluenceLensError(
            f"Split fractions {tuple(fractions)} must be three positive numbers summing to 1.",
            "for example 0.8 0.1 0.1",
        )
    if not 0 < downsample <= 1:
        raise InfluenceLensError(
            f"Downsampling ratio {downsample} must be in (0, 1].",
            "for example 0.5 to keep half of each class, 1 for all",
        )


def split_dataset(
    labels: np.ndarray,
    fractions: tuple[float, float, float] | str = (0.8, 0.1, 0.1),
    seed: int = 0,
    downsample: float = 1.0,
    classes: list[str] | None = None,
    ids: list[str] | None = None,
) -> Split:
    """Stratified, seeded split of positions ``0..n-1``; ``downsample`` keeps that fraction per class first.

    ``fractions="official"`` keeps the dataset's own train / test parts (read from ``ids``: Fashion-MNIST's
    60,000 ``train:`` / 10,000 ``t10k:`` images, tiny-imagenet's ``train/`` / ``val/`` folders) with no
    validation part; ``downsample`` then keeps that fraction of each class within each part.
    A classifier needs two classes: labels of a single class are refused.
    """
    from sklearn.model_selection import train_test_split

    if isinstance(fractions, str):
        check_split(fractions, downsample)
        return _official_split(np.asarray(labels), fractions, seed, downsample, ids)
    fractions = (float(fractions[0]), float(fractions[1]), float(fractions[2])) if len(fractions) == 3 else fractions
    check_split(tuple(fractions), downsample)
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        name = f" ({classes[int(labels[0])]})" if classes and len(labels) else ""
        raise InfluenceLensError(
            f"The data holds a single class{name}; a classifier needs at least two.",
            "choose two or more classes, or add a second class folder",
        )
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(downsample * len(members))))
        keep.append(rng.choice(members, size=k, replace=False) if k < len(members) else members)
    idx = np.sort(np.concatenate(keep))
    need = int(np.ceil(1 / min(fractions)))
    counts = np.bincount(labels[idx], minlength=labels.max() + 1)
    for c, count in enumerate(counts):
        if 0 < count < need:
            name = classes[c] if classes else str(c)
            raise InfluenceLensError(
                f"Class {name!r} has only {count} image(s) after downsampling; a stratified "
                f"{'/'.join(f'{f:g}' for f in fractions)} split needs at least {need} per class.",
                "add images, raise the downsampling ratio or drop that class",
            )
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=labels[idx], random_state=seed)
    val, test = train_test_split(
        rest, train_size=fractions[1] / (fractions[1] + fractions[2]), stratify=labels[rest], random_state=seed
    )
    return Split(np.sort(train), np.sort(val), np.sort(test))


# --- the image cache ---------------------------------------------------------------------------------------


def image_cache_dir() -> Path:
    """Where decoded images are cached: ``$INFLUENCE_LENS_CACHE``, else ``~/.cache/influence-lens``."""
    return Path(os.environ.get("INFLUENCE_LENS_CACHE", "~/.cache/influence-lens")).expanduser()


class BadImage(Exception):
    """An image the cache builder skips (its reason is the message)."""


@dataclass(frozen=True)
class ImageCache:
    """Decoded images of one dataset selection at one size, built once and then memory-mapped.

    ``images-<key>.npy`` holds ``(n, S, S, 3)`` uint8 (rows of skipped files are left out) and
    ``images-<key>.json`` which input rows were kept and why the others were skipped; both are written under a
    temporary name and renamed, so an interrupted build leaves nothing. ``key`` hashes what decides the pixels
    (file names, sizes and modification times, or the source arrays) and the size ``S``.
    """

    key: str
    size: int

    @property
    def images_path(self) -> Path:
        return image_cache_dir() / f"images-{self.key}.npy"

    @property
    def index_path(self) -> Path:
        return image_cache_dir() / f"images-{self.key}.json"

    def open(self, n: int, decode, names: list[str]) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        """The memory-mapped images, the kept input rows and ``(name, reason)`` of skipped ones; builds the
        cache first if needed by calling ``decode(i) -> (S, S, 3)`` uint8 for ``i < n`` (``BadImage``: skip)."""
        if not self.index_path.is_file():
            self._build(n, decode, names)
        index = read_json(self.index_path)
        images = np.load(self.images_path, mmap_mode="r")
        return images, index["kept"], [tuple(s) for s in index["skipped"]]

    def _build(self, n: int, decode, names: list[str]) -> None:
        from tqdm import tqdm

        self.images_path.parent.mkdir(parents=True, exist_ok=True)
        tmp, compact = (
            self.images_path.with_name(f".{self.images_path.stem}-{os.getpid()}{part}.npy") for part in ("", "-compact")
        )
        kept: list[int] = []
        skipped: list[tuple[str, str]] = []
        shape = (self.size, self.size, 3)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
            for i in tqdm(range(n), desc=f"caching {n} images", disable=None, mininterval=2):
                try:
                    out[len(kept)] = decode(i)
                except BadImage as e:
                    skipped.append((names[i], str(e)))
                    continue
                kept.append(i)
            if skipped:  # unreadable files are rare: copy the written rows into a file of the right length
                np.lib.format.open_memmap(compact, mode="w+", dtype=np.uint8, shape=(len(kept), *shape))[:] = out[
                    : len(kept)
                ]
                os.replace(compact, tmp)
            out.flush()
            del out
            os.replace(tmp, self.images_path)
        finally:
            tmp.unlink(missing_ok=True)
            compact.unlink(missing_ok=True)
        atomic_write_json(self.index_path, {"kept": kept, "skipped": skipped})
        log.info("cached %d images in %s", len(kept), self.images_path)


def _official_split(labels: np.ndarray, name: str, seed: int, downsample: float, ids: list[str] | None) -> Split:
    if name != "official":
        raise InfluenceLensError(f"Unknown split {name!r}.", "give three fractions (0.8 0.1 0.1) or 'official'")
    if not 0 < downsample <= 1:
        raise InfluenceLensError(f"Downsampling ratio {downsample} must be in (0, 1].")
    part = np.array([_official_part(i) for i in ids or []])
    if ids is None or not len(part) or (part == "").any() or not (part == "test").any():
        raise InfluenceLensError(
            "This dataset has no official train / test split.",
            "use it with fashion-mnist or tiny-imagenet, or give fractions: --split 0.8 0.1 0.1",
        )
    rng = np.random.default_rng(seed)
    chosen = {}
    for which in ("train", "test"):
        keep = []
        for c in np.unique(labels):
            members = np.flatnonzero((labels == c) & (part == which))
            k = int(round(downsample * len(members)))
            keep.append(rng.choice(members, size=k, replace=False) if k < len(members) else members)
        chosen[which] = np.sort(np.concatenate(keep))
    return Split(chosen["train"], np.zeros(0, dtype=np.int64), chosen["test"])


def _official_part(sample_id: str) -> str:
    """``train`` / ``test`` for ids of datasets with an official split, else ``""``."""
    if sample_id.startswith(("train:", "train/")):
        return "train"
    if sample_id.startswith(("t10k:", "val/")):
        return "test"
    return ""


# --- class selection -------------------------------------------------------------------------------------


def resolve_classes(
    requested: list[str] | None, keys: list[str], names: list[str], index_keys: list[str] | None = None
) -> list[int]:
    """Positions into ``keys`` for each requested class.

    A request matches a key exactly, a synonym in ``names`` (comma-separated, case-insensitive), a unique
    prefix of a synonym, or an integer index into ``index_keys`` (default ``keys``). Unknown or ambiguous
    requests raise an error listing the close matches.
    """
    if not requested:
        return list(range(len(keys)))
    synonyms = [[s.strip().lower() for s in n.split(",") if s.strip()] for n in names]
    index_keys = index_keys if index_keys is not None else keys
    chosen: list[int] = []
    for req in requested:
        r = req.strip().lower()
        hits = [i for i, k in enumerate(keys) if k.lower() == r]
        if not hits and r.isdigit():
            pos = int(r)
            if pos < len(index_keys) and index_keys[pos] in keys:
                hits = [keys.index(index_keys[pos])]
        if not hits:
            hits = [i for i, syn in enumerate(synonyms) if r in syn]
        if not hits:
            hits = [i for i, syn in enumerate(synonyms) if any(s.startswith(r) for s in syn)]
        if len(hits) == 1:
            if hits[0] in chosen:
                raise InfluenceLensError(f"Class {req!r} was given twice.", "list each class once")
            chosen.append(hits[0])
            continue
        if hits:
            options = ", ".join(f"{keys[i]} ({names[i]})" for i in hits[:8])
            raise InfluenceLensError(
                f"Class name {req!r} is ambiguous: it matches {options}.", "give the full name or the id"
            )
        flat = [s for syn in synonyms for s in syn]
        close = [s for s in flat if r in s][:5] or difflib.get_close_matches(
            r, flat + [k.lower() for k in keys], n=5, cutoff=0.6
        )
        hint = "close matches: " + ", ".join(close) if close else "list the classes with `influence-core classes`"
        raise InfluenceLensError(f"Unknown class {req!r} (the dataset has {len(keys)} classes).", hint)
    return chosen


# --- tiny-imagenet ---------------------------------------------------------------------------------------


def _tiny_imagenet_index(root: Path) -> tuple[list[str], dict[str, str]]:
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file() or not (root / "train").is_dir():
        raise InfluenceLensError(
            f"{root} does not look like tiny-imagenet-200: wnids.txt or train/ is missing.",
            "point tiny-imagenet:PATH at the folder that holds wnids.txt, words.txt, train/ and val/, "
            "or use folder:PATH for one sub-folder per class",
        )
    wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
    words: dict[str, str] = {}
    words_file = root / "words.txt"
    if words_file.is_file():
        wanted = set(wnids)
        for line in words_file.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in wanted:
                words[wnid] = text.strip()
    return wnids, words


def _tiny_imagenet_files(root: Path, classes: list[str] | None):
    wnids, words = _tiny_imagenet_index(root)
    present = [w for w in wnids if (root / "train" / w / "images").is_dir()]
    if not present:
        raise InfluenceLensError(
            f"{root}/train has no <wnid>/images folders.", "check that the dataset was unpacked completely"
        )
    if classes:
        keys = [wnids[i] for i in resolve_classes(classes, wnids, [words.get(w, w) for w in wnids])]
        missing = [k for k in keys if k not in present]
        if missing:
            raise InfluenceLensError(
                f"Class {', '.join(f'{words.get(k, k)} ({k})' for k in missing)} is in wnids.txt but has no "
                f"train/<wnid>/images folder under {root}.",
                f"pick from the {len(present)} classes on disk: "
                + ", ".join(words.get(k, k).split(",")[0] for k in present[:20]),
            )
    else:
        keys = present
    names = [words.get(k, k).split(",")[0].strip() for k in keys]
    files: dict[str, list[str]] = {k: [] for k in keys}
    for k in keys:
        files[k] = sorted(
            f"train/{k}/images/{p.name}"
            for p in (root / "train" / k / "images").iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES
        )
    annotations = root / "val" / "val_annotations.txt"
    if annotations.is_file():
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in files and (root / "val" / "images" / parts[0]).is_file():
                files[parts[1]].append(f"val/images/{parts[0]}")
    return keys, names, files


# --- image folders ---------------------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise InfluenceLensError(
            f"{root} has no class sub-folders.", "arrange images as PATH/<class name>/<image files>"
        )
    return dirs


def _folder_files(root: Path, classes: list[str] | None):
    dirs = _class_dirs(root)
    keys = [d.name for d in dirs]
    chosen = resolve_classes(classes, keys, keys)
    keys = [keys[i] for i in chosen]
    files = {
        k: sorted(
            str(p.relative_to(root))
            for p in (root / k).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for k in keys
    }
    return keys, keys, files


def _read_images(spec, root, keys, names, files, size, on_bad_image) -> ImageSet:
    for label, key in enumerate(keys):
        if not files[key]:
            raise InfluenceLensError(
                f"Class {names[label]!r} ({key}) has no image files.",
                f"add images to {root / key} or leave the class out",
            )
    listing = [(rel, label) for label, key in enumerate(keys) for rel in files[key]]
    stats = [(rel, *_stat(root / rel)) for rel, _ in listing]
    cache = ImageCache(stable_hash("files", str(root.resolve()), size, stats), size)

    def decode(i: int) -> np.ndarray:
        try:
            return _load_rgb(root / listing[i][0], size)
        except BAD_IMAGE_ERRORS as e:
            if on_bad_image == "error":
                raise InfluenceLensError(
                    f"Cannot read image {root / listing[i][0]}: {e}",
                    "delete or replace the file, or run with --on-bad-image skip",
                ) from e
            raise BadImage(f"{type(e).__name__}: {e}") from e

    images, kept, skipped = cache.open(len(listing), decode, [rel for rel, _ in listing])
    if skipped and on_bad_image == "error":
        rel, reason = skipped[0]
        raise InfluenceLensError(
            f"Cannot read image {root / rel}: {reason}", "delete or replace the file, or run with --on-bad-image skip"
        )
    labels = np.asarray([listing[i][1] for i in kept], dtype=np.int64)
    for label, key in enumerate(keys):
        if label not in labels:
            raise InfluenceLensError(
                f"No readable image in class {names[label]!r} ({key}).", "replace the unreadable files listed above"
            )
    return ImageSet(spec, [listing[i][0] for i in kept], labels, names, keys, images, skipped)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _load_rgb(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


# --- array datasets ---------------------------------------------------------------------------------------


def _from_gray_arrays(spec, ids, gray: np.ndarray, labels, class_names, classes, size) -> ImageSet:
    keys = [str(i) for i in range(len(class_names))]
    chosen = resolve_classes(classes, keys, class_names)
    keep = np.isin(labels, chosen)
    remap = {old: new for new, old in enumerate(chosen)}
    gray = gray[keep]
    ids = [i for i, k in zip(ids, keep, strict=True) if k]

    def resize(i: int) -> np.ndarray:
        return np.repeat(
            np.asarray(Image.fromarray(gray[i]).resize((size, size), Image.Resampling.BILINEAR))[..., None], 3, 2
        )

    images, _, _ = ImageCache(stable_hash("arrays", ids, gray, size), size).open(len(gray), resize, ids)
    return ImageSet(
        spec,
        ids,
        np.array([remap[v] for v in labels[keep]], dtype=np.int64),
        [class_names[c] for c in chosen],
        [keys[c] for c in chosen],
        images,
    )


def _load_digits(spec, classes, size) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    ids = [f"digits:{i}" for i in range(len(gray))]
    return _from_gray_arrays(spec, ids, gray, d.target.astype(np.int64), [str(i) for i in range(10)], classes, size)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    if dtype != 0x08:
        raise InfluenceLensError(f"{path} is not an unsigned-byte IDX file.", "use the original Fashion-MNIST files")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion_mnist(spec, root: Path, classes, size) -> ImageSet:
    root = _existing_dir(root, "fashion-mnist")
    parts = []
    for part in ("train", "t10k"):
        found = {}
        for what in ("images-idx3", "labels-idx1"):
            hits = sorted(root.glob(f"{part}-{what}-ubyte*"))
            if not hits:
                raise InfluenceLensError(
                    f"{root} has no {part}-{what}-ubyte(.gz) file.",
                    "point fashion-mnist:PATH at the folder with the four IDX files "
                    "(Debian: apt-get install dataset-fashion-mnist)",
                )
            found[what] = _read_idx(hits[0])
        parts.append((part, found["images-idx3"], found["labels-idx1"]))
    ids = [f"{p}:{i}" for p, imgs, _ in parts for i in range(len(imgs))]
    gray = np.concatenate([imgs for _, imgs, _ in parts])
    labels = np.concatenate([lab for _, _, lab in parts]).astype(np.int64)
    return _from_gray_arrays(spec, ids, gray, labels, FASHION_MNIST_CLASSES, classes, size)


def _existing_dir(path: Path, kind: str) -> Path:
    path = path.expanduser()
    if not path.exists():
        raise InfluenceLensError(
            f"Dataset folder {path} does not exist.",
            f"check the path in {kind}:PATH (relative paths start at the current folder)",
        )
    if not path.is_dir():
        raise InfluenceLensError(f"{path} is a file, not a folder.", f"give {kind}:PATH the dataset's folder")
    return path
