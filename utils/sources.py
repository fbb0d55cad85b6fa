"""Inference sources: image files, folders, globs, .txt lists, videos, webcams and URLs.

`load_source(source)` checks the source up front (so a bad path fails before any model work) and
returns an iterator of `Frame`s holding the original BGR image; resizing is the consumer's job.
"""
import glob
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np

from utils.logging import LOGGER

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://", "tcp://", "udp://")
MAX_BAD_FRAMES = 5  # consecutive unreadable frames after which the rest of a video is given up


@dataclass
class Frame:
    path: str  # file path, URL or webcam index as given
    name: str  # file name the outputs are derived from ('x.jpg', 'clip.mp4', 'webcam0')
    im0: np.ndarray  # original image, BGR uint8 [h, w, 3]
    kind: str  # 'image' | 'video' | 'stream'
    index: int  # 1-based position of this file among the source's files
    count: int  # number of files in the source
    frame: int = 0  # 1-based frame number within a video or stream (0 for images)
    frames: int = 0  # frames a video will yield (0 when unknown)
    fps: float = 30.0

    def describe(self) -> str:
        """Log prefix, e.g. 'image 3/20 /data/x.jpg: ' or 'video 1/1 (7/90) /data/clip.mp4: '."""
        if self.kind == "image":
            return f"image {self.index}/{self.count} {self.path}: "
        if self.kind == "video":
            return f"video {self.index}/{self.count} ({self.frame}/{self.frames}) {self.path}: "
        return f"{self.path} ({self.frame}): "


def suffix(path) -> str:
    return Path(str(path)).suffix[1:].lower()


def is_url(source) -> bool:
    return str(source).lower().startswith(STREAM_SCHEMES)


def _url_name(url: str) -> str:
    name = Path(urlparse(url).path).name
    return name or urlparse(url).netloc or "stream"


def list_files(source) -> list:
    """Expand a file, folder, glob or .txt list into media paths; raise clearly when nothing usable remains."""
    src = str(source)
    if any(ch in src for ch in "*?["):
        paths = sorted(glob.glob(src, recursive=True))
        if not paths:
            raise FileNotFoundError(f"No files match the glob '{src}'")
        found = [p for p in paths if Path(p).is_file() and suffix(p) in IMG_FORMATS + VID_FORMATS]
    else:
        p = Path(src).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"Source '{src}' does not exist")
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and suffix(f) in IMG_FORMATS + VID_FORMATS)
        elif suffix(p) == "txt":
            found = _read_list(p)
        elif suffix(p) in IMG_FORMATS + VID_FORMATS:
            found = [str(p)]
        else:
            raise ValueError(f"Unsupported file type '{src}': images {IMG_FORMATS}, videos {VID_FORMATS}, "
                             f"or a .txt list of paths")
    if not found:
        raise FileNotFoundError(f"No images or videos found in '{src}' (images {IMG_FORMATS}, videos {VID_FORMATS})")
    return found


def _read_list(txt: Path) -> list:
    """A .txt of paths, one a line ('#' comments allowed); relative paths resolve against the file's folder."""
    out = []
    for line in txt.read_text(errors="ignore").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        if not p.exists() and not p.is_absolute():
            p = txt.parent / p
        if not p.is_file():
            LOGGER.warning(f"WARNING ⚠️ {txt}: '{line}' not found, skipped")
        elif suffix(p) not in IMG_FORMATS + VID_FORMATS:
            LOGGER.warning(f"WARNING ⚠️ {txt}: '{line}' is not a supported image or video, skipped")
        else:
            out.append(str(p))
    return out


def load_source(source, vid_stride: int = 1):
    """Iterator of Frames for any supported source; raises FileNotFoundError/ValueError/ConnectionError early."""
    if vid_stride < 1:
        raise ValueError(f"vid_stride={vid_stride} must be >= 1")
    src = str(source).strip()
    if src.isnumeric():
        return iter_stream(int(src), vid_stride)
    if is_url(src):
        if suffix(urlparse(src).path) in IMG_FORMATS:
            return iter_url_image(src)
        return iter_stream(src, vid_stride)
    return iter_files(list_files(src), vid_stride)


def iter_files(paths: list, vid_stride: int = 1):
    """Images and videos in order; unreadable images and frames are skipped with a warning."""
    n = len(paths)
    for i, path in enumerate(paths, 1):
        if suffix(path) in VID_FORMATS:
            yield from iter_video(path, i, n, vid_stride)
            continue
        im0 = cv2.imread(path)
        if im0 is None:
            LOGGER.warning(f"WARNING ⚠️ image {i}/{n} {path}: cannot be read, skipped")
            continue
        yield Frame(path, Path(path).name, im0, "image", i, n)


def iter_video(path: str, index: int = 1, count: int = 1, vid_stride: int = 1):
    """Every vid_stride-th frame of a video file; a few unreadable frames are skipped, a run of them ends it."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        LOGGER.warning(f"WARNING ⚠️ video {index}/{count} {path}: cannot be opened, skipped")
        return
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    frames = -(-total // vid_stride)  # ceil
    pos, n, bad = 0, 0, 0  # frames consumed from the file, frames yielded, consecutive failures
    try:
        while total <= 0 or pos < total:
            for _ in range(vid_stride - 1):  # skipped frames are only grabbed, not decoded
                cap.grab()
            pos += vid_stride
            ok, im0 = cap.read()
            if not ok or im0 is None:
                if total <= 0 or pos >= total:  # end of file
                    break
                bad += 1
                LOGGER.warning(f"WARNING ⚠️ video {index}/{count} {path}: frame {pos}/{total} unreadable, skipped")
                if bad >= MAX_BAD_FRAMES:
                    LOGGER.warning(f"WARNING ⚠️ {path}: {bad} unreadable frames in a row, rest of the video "
                                   f"skipped")
                    break
                continue
            bad, n = 0, n + 1
            yield Frame(path, Path(path).name, im0, "video", index, count, n, frames, fps)
    finally:
        cap.release()


def iter_url_image(url: str, timeout: float = 10.0):
    """One image downloaded into memory."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except Exception as e:
        raise ConnectionError(f"Could not download image '{url}': {e}") from e
    im0 = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if im0 is None:
        raise ValueError(f"'{url}' did not return a decodable image")
    yield Frame(url, _url_name(url), im0, "image", 1, 1)


class _LatestFrameReader:
    """Background reader keeping only the newest frame, so slow inference never lags a live stream."""

    def __init__(self, cap, vid_stride: int):
        self.cap, self.vid_stride = cap, vid_stride
        self.lock, self.frame, self.seq, self.done = threading.Lock(), None, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while not self.done and self.cap.grab():
            n += 1
            if n % self.vid_stride:
                continue
            ok, im = self.cap.retrieve()
            if ok:
                with self.lock:
                    self.frame, self.seq = im, self.seq + 1
        self.done = True

    def next(self, last_seq: int, timeout: float = 10.0):
        """Newest frame after last_seq -> (seq, frame); (last_seq, None) once the stream ended or stalled."""
        t = time.time()
        while time.time() - t < timeout:
            with self.lock:
                if self.seq > last_seq:
                    return self.seq, self.frame
            if self.done:
                break
            time.sleep(0.002)
        return last_seq, None

    def stop(self):
        self.done = True
        self.thread.join(timeout=2)


def iter_stream(src, vid_stride: int = 1):
    """Webcam index or stream URL; raises ConnectionError right away if it cannot be opened."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # its open warnings repeat the error below
    try:
        cap = cv2.VideoCapture(src)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not cap.isOpened():
        what = f"webcam {src}" if isinstance(src, int) else f"stream '{src}'"
        raise ConnectionError(f"Failed to open {what}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    fps = fps if 0 < fps < 1000 else 30.0  # some webcams report 0 or nonsense
    name = f"webcam{src}" if isinstance(src, int) else _url_name(src)
    return _stream_frames(cap, str(src), name, fps, vid_stride)


def _stream_frames(cap, path, name, fps, vid_stride):
    reader = _LatestFrameReader(cap, vid_stride)
    seq, n = 0, 0
    try:
        while True:
            seq, im0 = reader.next(seq)
            if im0 is None:
                LOGGER.info(f"{path}: stream ended")
                return
            n += 1
            yield Frame(path, name, im0, "stream", 1, 1, n, 0, fps)
    finally:
        reader.stop()
        cap.release()
