"""Ways to damage a file for the reliability tests: flip one bit inside a torch checkpoint's
tensor data (the bytes `torch.load` reads back without any check of its own)."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path


def tensor_data_span(path: Path) -> tuple[int, int]:
    """(offset, length) in the file of the largest tensor record of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of the file in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def flip_tensor_bit(path: Path, fraction: float = 0.5, bit: int = 3) -> None:
    """Flip a bit in the middle (or at `fraction`) of the largest tensor's data."""
    start, length = tensor_data_span(path)
    flip_bit(path, start + int(length * fraction), bit)
