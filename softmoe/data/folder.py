"""ImageFolder directories (`ROOT/train/<class>/<image>`, `ROOT/test/...` or `ROOT/val/...`)
decoded once with PIL into uint8 arrays, and cached.

Decoding 60k small JPEGs costs ~120 us each on one core (~7 s), so the result is cached as
an .npz keyed by the split directory's path and the (name, size, mtime) of every file: a
changed, added or removed file gives a new key. The cache is written to a temporary file and
renamed into place, so a crash never leaves a half cache that a later run would read.
Large folders are decoded in a process pool.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from softmoe._io import atomic_write, user_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 1
POOL_MIN_FILES = 4096  # below this a pool's start-up costs more than it saves


def default_cache_dir() -> Path:
    return user_cache_dir("decoded", "SOFTMOE_CACHE_DIR")


def split_directory(root: Path, split: str) -> Path:
    """`root/<split>`, where "test" falls back to "val" (datasets that ship their test set as
    val/). A missing "val" is an error, never a fall-back to the test set: a validation split
    of the training set is TrainConfig.val_split."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {str(root)!r} does not exist or is not a directory")
    alternatives = {"train": ["train"], "test": ["test", "val"], "val": ["val"]}
    if split not in alternatives:
        raise ValueError(f"split must be one of ['train', 'test', 'val'], got {split!r}")
    for name in alternatives[split]:
        if (root / name).is_dir():
            return root / name
    names = " or ".join(repr(a + "/") for a in alternatives[split])
    raise FileNotFoundError(f"ImageFolder {str(root)!r} has no {names} subdirectory "
                            f"(expected {root}/train/<class>/<image> and {root}/test/... or {root}/val/...)")


def list_classes(directory: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{str(directory)!r} holds no class subdirectories (expected {directory}/<class>/<image>)")
    return classes


def list_files(directory: Path, classes: list[str]) -> list[tuple[str, int, int, int]]:
    """(relative path, label, size, mtime_ns) of every image file, sorted, for `classes` folders
    present under `directory`. A class folder not in `classes` is an error (labels would be wrong)."""
    present = list_classes(directory)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ValueError(f"{str(directory)!r} has class folders {unknown} that the train split lacks "
                         f"(train classes: {classes})")
    files = []
    for label, cls in enumerate(classes):
        cdir = directory / cls
        if not cdir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                    full = os.path.join(dirpath, fname)
                    st = os.stat(full)
                    files.append((os.path.relpath(full, directory), label, st.st_size, st.st_mtime_ns))
    return files


def _decode(path: str, image_size: int | None) -> np.ndarray | str:
    """One image as uint8 (H, W) if grayscale or (H, W, 3), or an error message."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F", "P") and not (im.mode == "P" and _palette_is_color(im))
            if image_size is not None:
                im.draft("L" if gray else "RGB", (image_size, image_size))
            im = im.convert("L" if gray else "RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8).copy()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        return f"{type(e).__name__}: {e}"


def _palette_is_color(im) -> bool:
    pal = im.getpalette() or []
    rgb = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)
    return bool((rgb != rgb[:, :1]).any())


def _decode_chunk(args: tuple[list[str], int | None]) -> list[np.ndarray | str]:
    paths, image_size = args
    return [_decode(p, image_size) for p in paths]


def _decode_all(paths: list[str], image_size: int | None, workers: int) -> list[np.ndarray | str]:
    if workers <= 1 or len(paths) < POOL_MIN_FILES:
        return _decode_chunk((paths, image_size))
    import multiprocessing

    # fork: the workers need only PIL and numpy, and skip re-importing torch (seconds each).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    ctx = multiprocessing.get_context(method)
    chunk = max(256, len(paths) // (workers * 8))
    chunks = [(paths[i:i + chunk], image_size) for i in range(0, len(paths), chunk)]
    out: list[np.ndarray | str] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for part in pool.map(_decode_chunk, chunks):
            out.extend(part)
    return out


def _cache_key(directory: Path, classes: list[str], files, image_size, skip_bad: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, str(directory.resolve()), classes, image_size, skip_bad]).encode())
    for rel, label, size, mtime in files:
        h.update(f"{rel}\0{label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:20]


def _write_cache_atomic(path: Path, **arrays) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def read_image_folder(root: str | Path, split: str = "train", image_size: int | None = None,
                      skip_bad: bool = False, cache: bool = True, cache_dir: str | Path | None = None,
                      workers: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Decode `root/<split>/<class>/*` into (images uint8 (N, C, H, W), labels int64 (N,),
    classes, number of skipped files). Class indices follow the sorted folder names of
    `root/train` so every split agrees. All images must share one size unless `image_size`
    resizes them to a square. Unreadable files raise ValueError naming the file, or with
    `skip_bad=True` are skipped and counted (a warning says how many)."""
    root = Path(root)
    directory = split_directory(root, split)
    classes = list_classes(split_directory(root, "train"))
    files = list_files(directory, classes)
    if not files:
        raise ValueError(f"{str(directory)!r} holds no image files with extensions {IMAGE_EXTENSIONS}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")

    cache_path = None
    if cache:
        key = _cache_key(directory, classes, files, image_size, skip_bad)
        cache_path = Path(cache_dir or default_cache_dir()) / f"{root.name or 'folder'}-{directory.name}-{key}.npz"
        if cache_path.is_file():
            try:
                with np.load(cache_path, allow_pickle=False) as z:
                    return z["images"], z["labels"], [str(c) for c in z["classes"]], int(z["skipped"])
            except (OSError, ValueError, KeyError) as e:
                warnings.warn(f"ignoring unreadable dataset cache {cache_path}: {e}", stacklevel=2)

    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    decoded = _decode_all([str(directory / rel) for rel, *_ in files], image_size, workers)
    arrays, labels, bad = [], [], []
    for (rel, label, _, _), arr in zip(files, decoded):
        if isinstance(arr, str):
            bad.append((rel, arr))
            continue
        arrays.append(arr)
        labels.append(label)
    if bad and not skip_bad:
        rel, err = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"cannot read image file {str(directory / rel)!r}: {err}{more}; "
                         f"pass skip_bad=True (config: skip_bad_images=true) to skip unreadable files")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {directory}, first: {bad[0][0]} ({bad[0][1]})",
                      stacklevel=2)
    if not arrays:
        raise ValueError(f"no readable image in {str(directory)!r}")
    shape0 = arrays[0].shape[:2]
    kept_files = [f for f, a in zip(files, decoded) if not isinstance(a, str)]
    for (rel, *_), a in zip(kept_files, arrays):
        if a.shape[:2] != shape0:
            raise ValueError(f"images differ in size: {str(directory / kept_files[0][0])!r} is "
                             f"{shape0[1]}x{shape0[0]} but {str(directory / rel)!r} is {a.shape[1]}x{a.shape[0]}; "
                             f"pass image_size=N to resize every image to NxN while loading")
    color = any(a.ndim == 3 for a in arrays)
    if color:  # order-independent: any color image makes the whole set RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
        images = np.stack(arrays).transpose(0, 3, 1, 2)  # (N, 3, H, W)
    else:
        images = np.stack(arrays)[:, None]  # (N, 1, H, W)
    images = np.ascontiguousarray(images)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if cache_path is not None:
        try:
            _write_cache_atomic(cache_path, images=images, labels=labels_arr, classes=np.asarray(classes),
                                skipped=np.asarray(len(bad)))
        except OSError as e:
            warnings.warn(f"could not write dataset cache {cache_path}: {e}", stacklevel=2)
    return images, labels_arr, classes, len(bad)
