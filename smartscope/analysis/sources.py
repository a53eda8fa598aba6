"""The stacks of an analysis: found from files and folders, read a range of frames at a time.

An input is a TIFF / OME-TIFF file, an OME-Zarr (its `.zarr` folder), or a
folder: a smartscope run (`frames.ome.tif`, `frames/frames_p000.ome.tif`, …,
`frames.ome.zarr/<p>/0`; a run cut short by a crash too) or any folder of
such stacks. Each series is one `Stack`; its frames are its leading axes flattened in order (t, then c, z for
a multi-dimensional plan), so a stack is always (frames, y, x). Nothing is read
whole: `read_frames` reads the range asked for, from the TIFF's pages or the
Zarr chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile

from smartscope.inference.offline import StackError, camera_tiff_pixel_nm

TIFF_SUFFIXES = (".tif", ".tiff")
_ZARR_UNIT_NM = {"micrometer": 1000.0, "nanometer": 1.0, "millimeter": 1e6}


@dataclass(frozen=True)
class Stack:
    """One (frames, y, x) series of camera frames; `array`: the Zarr array's path inside `path`."""

    path: str
    name: str
    kind: str  # "tiff" | "tiff-cut" (an OME-TIFF whose writer was killed) | "zarr"
    n_frames: int
    height: int
    width: int
    dtype: str
    pixel_size_nm: float | None
    array: str = ""

    def signature(self) -> dict:
        """What identifies this input's content for resuming: path, size and modification time."""
        p = Path(self.path) / self.array if self.kind == "zarr" else Path(self.path)
        meta = p / "zarr.json" if p.is_dir() else p
        st = meta.stat()
        return {"path": self.path, "array": self.array, "n_frames": self.n_frames, "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns}


def discover(inputs: list[str | Path]) -> list[Stack]:
    """Every stack under `inputs`, in the order given (a folder's stacks sorted by name); StackError
    with what to fix for an input that is missing, unreadable, or holds no stack."""
    stacks: list[Stack] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise StackError(f"{path}: no such file or folder")
        if _is_zarr(path):
            stacks += _zarr_stacks(path)
        elif path.is_dir():
            found = _stacks_in_folder(path)
            if not found:
                raise StackError(f"{path}: no TIFF / OME-TIFF or OME-Zarr stack in this folder")
            stacks += found
        else:
            stacks.append(_tiff_stack(path))
    names: dict[str, int] = {}
    unique = []
    for s in stacks:  # several inputs may share a file name: the output folders must not
        n = names[s.name] = names.get(s.name, 0) + 1
        unique.append(s if n == 1 else Stack(**{**s.__dict__, "name": f"{s.name}-{n}"}))
    return unique


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and (path.suffix == ".zarr" or (path / "zarr.json").is_file()
                              or (path / ".zgroup").is_file())


def _stacks_in_folder(folder: Path) -> list[Stack]:
    found = []
    for p in sorted(folder.iterdir()):
        if _is_zarr(p):
            found += _zarr_stacks(p)
        elif p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES):
            found.append(_tiff_stack(p))
        elif p.is_dir() and p.name == "frames":  # a smartscope run of several positions
            found += _stacks_in_folder(p)
    return found


def _tiff_stack(path: Path) -> Stack:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype, pixel_nm = series.shape, series.dtype, camera_tiff_pixel_nm(tif, path)
            one_page = len(tif.pages) == 1
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        if isinstance(e, StackError):
            raise
        raise StackError(f"{path}: cannot be read as TIFF ({e})") from e
    if one_page:  # perhaps a run cut short by a crash: one page, the other frames' pixels behind it
        from smartscope.storage.frames import frames_on_disk  # (here: it loads the acquisition writers)

        n_on_disk = frames_on_disk(path)
        if n_on_disk > 1:
            return _checked(path, "tiff-cut", (n_on_disk, *shape[-2:]), dtype, pixel_nm,
                            name=path.name.split(".")[0])
    return _checked(path, "tiff", shape, dtype, pixel_nm, name=path.name.split(".")[0])


def _zarr_stacks(path: Path) -> list[Stack]:
    """The full-resolution array of each OME-Zarr image (multiscales) under `path`."""
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several types for a folder that is not a group
        raise StackError(f"{path}: cannot be read as OME-Zarr ({e})") from e
    stacks = []
    for sub, group in [("", root), *sorted(root.groups())]:
        attrs = dict(group.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            continue
        ms = multiscales[0]
        dataset = ms["datasets"][0]
        array = group[dataset["path"]]
        pixel_nm = None
        scale = next((t["scale"] for t in dataset.get("coordinateTransformations", []) if t["type"] == "scale"),
                     None)
        unit = ms["axes"][-1].get("unit") if ms.get("axes") else None
        if scale and unit in _ZARR_UNIT_NM:
            pixel_nm = float(scale[-1]) * _ZARR_UNIT_NM[unit]
        name = path.name.split(".")[0] + (f"_p{int(sub):03d}" if sub.isdigit() else f"_{sub}" if sub else "")
        stacks.append(_checked(path, "zarr", array.shape, array.dtype, pixel_nm, name=name,
                               array=f"{sub}/{dataset['path']}".lstrip("/")))
    if not stacks:
        raise StackError(f"{path}: no OME-Zarr image (multiscales metadata) in it")
    return stacks


def _checked(path: Path, kind: str, shape: tuple, dtype: np.dtype, pixel_nm: float | None, *, name: str,
             array: str = "") -> Stack:
    if len(shape) < 2 or any(s == 0 for s in shape):
        raise StackError(f"{path}: shape {shape} holds no frames")
    if np.dtype(dtype).kind not in "uif":
        raise StackError(f"{path}: pixel type {dtype} is not camera data (need uint8/16/32 or float)")
    if len(shape) >= 3 and shape[-1] in (3, 4) and shape[-3] > 4:
        raise StackError(f"{path}: shape {shape} looks like colour samples last; save single-channel frames")
    n_frames = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return Stack(str(path), name, kind, n_frames, int(shape[-2]), int(shape[-1]), str(np.dtype(dtype)),
                 pixel_nm, array)


@lru_cache(maxsize=8)
def _open(stack: Stack):
    """The stack's frames as an object indexed by a slice of frames, opened once per process.

    TIFF pages are read into memory, not memory-mapped: a map's pages would count in the process's
    resident memory for as long as the file is open, so a long stack would look like a leak.
    """
    if stack.kind == "zarr":
        import zarr

        array = zarr.open_array(str(Path(stack.path) / stack.array), mode="r")
        return array if array.ndim == 3 else _FlatFrames(array)
    if stack.kind == "tiff-cut":
        from smartscope.storage.frames import read_frames as read_run_frames

        return read_run_frames(Path(stack.path))  # storage's reader of such files (memory-mapped)
    return _TiffPages(stack.path)


class _FlatFrames:
    """A Zarr array of more than three axes indexed by flat frame number (its leading axes in order)."""

    def __init__(self, array) -> None:
        self.array = array
        self.lead = array.shape[:-2]

    def __getitem__(self, frames: slice) -> np.ndarray:
        idx = range(*frames.indices(int(np.prod(self.lead))))
        return np.stack([self.array[np.unravel_index(i, self.lead)] for i in idx])


class _TiffPages:
    def __init__(self, path: str) -> None:
        self.tif = tifffile.TiffFile(path)

    def __getitem__(self, frames: slice) -> np.ndarray:
        series = self.tif.series[0]
        idx = range(*frames.indices(len(series.pages)))
        return self.tif.asarray(key=idx, series=0).reshape(len(idx), *series.shape[-2:])


def read_frames(stack: Stack, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) of `stack` as a (n, y, x) array in the file's dtype."""
    try:
        return np.asarray(_open(stack)[start:stop])
    except Exception as e:  # a file truncated or changed since it was found
        raise StackError(f"{stack.path}: frames {start}..{stop - 1} cannot be read ({e})") from e

