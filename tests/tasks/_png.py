"""A PNG check that needs neither PIL nor matplotlib: signature, IHDR (with its CRC) and the IEND trailer."""
import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a valid PNG file; AssertionError naming the defect otherwise."""
    data = Path(path).read_bytes()
    assert data[:8] == SIGNATURE, f"{path}: not a PNG (signature {data[:8]!r})"
    length, ctype = struct.unpack(">I4s", data[8:16])
    assert ctype == b"IHDR" and length == 13, f"{path}: first chunk is {ctype!r} ({length} bytes), not IHDR"
    ihdr = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    assert zlib.crc32(b"IHDR" + ihdr) == crc, f"{path}: IHDR CRC mismatch"
    width, height, depth, color = struct.unpack(">IIBB", ihdr[:10])
    assert depth in (1, 2, 4, 8, 16) and color in (0, 2, 3, 4, 6), f"{path}: bad IHDR depth {depth} color {color}"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", f"{path}: no IEND trailer (truncated?)"
    assert b"IDAT" in data, f"{path}: no image data"
    return width, height
