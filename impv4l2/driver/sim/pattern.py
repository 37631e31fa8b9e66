"""The sim sensor's test pattern (in the spirit of vivid) and its read-back.

Layout, in fractions of the frame so every channel size shows the same
picture (each size is rendered natively, never scaled):

- top ``CODE_ROWS`` bands of ``1/24`` height: machine-readable OSD rows of
  ``CELLS`` black/white blocks — guard ``W B``, 32 data bits (MSB first),
  4 check bits (XOR of the 8 data nibbles), guard ``B W``.  Row 0 carries
  the frame counter (the channel's sequence), rows 1/2 the low/high 32 bits
  of the capture timestamp in microseconds.  Big blocks survive scaling,
  4:2:0/4:2:2 round trips and mild H.264/JPEG compression.
- below: the same numbers as human-readable digits (5x7 font);
- 100 % colour bars, then a horizontal luma ramp at the bottom;
- a yellow box sliding left to right (one pass every 4 s), drawn per frame.

The static part is precomputed per size as one NV12 array; per frame the
producer copies it once and draws only the box and the OSD (small slices).
"""

from __future__ import annotations

import functools

import numpy as np

CELLS = 40  # blocks per OSD row
CODE_ROWS = 3  # counter, timestamp low, timestamp high
BAND = 24  # the frame height is divided in 24 bands
DIGIT_BANDS = (3, 5)  # digits occupy bands 3..5
BARS_BANDS = (5, 18)  # colour bars; the ramp fills the rest
BLACK, WHITE = 16, 235  # BT.601 limited range levels

# 100 % colour bars, BT.601 limited range (Y, U, V)
BARS_YUV = (
    (235, 128, 128),  # white
    (210, 16, 146),  # yellow
    (170, 166, 16),  # cyan
    (145, 54, 34),  # green
    (106, 202, 222),  # magenta
    (81, 90, 240),  # red
    (41, 240, 110),  # blue
    (16, 128, 128),  # black
)
BOX_YUV = (210, 16, 146)  # yellow
BOX_PERIOD_S = 4.0

_FONT = {  # 5x7 glyphs
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    ".": ("00000", "00000", "00000", "00000", "00000", "01100", "01100"),
    " ": ("00000",) * 7,
}
_GLYPH_INDEX = {c: i for i, c in enumerate(_FONT)}


def _band_rows(height: int, first: int, last: int) -> tuple[int, int]:
    return first * height // BAND, last * height // BAND


def _even(v: float) -> int:
    return int(v) & ~1


def _bits(values: np.ndarray) -> np.ndarray:
    """(n,) uint32 values -> (n, CELLS) 0/1 cells with guards and check bits."""
    values = values.astype(np.uint64)
    data = (values[:, None] >> np.arange(31, -1, -1, dtype=np.uint64)) & 1
    nibbles = (values[:, None] >> np.arange(28, -4, -4, dtype=np.uint64)) & 0xF
    check = np.bitwise_xor.reduce(nibbles, axis=1)
    check_bits = (check[:, None] >> np.arange(3, -1, -1, dtype=np.uint64)) & 1
    n = len(values)
    return np.concatenate((
        np.tile([1, 0], (n, 1)), data, check_bits, np.tile([0, 1], (n, 1)),
    ), axis=1).astype(np.intp)


class Pattern:
    """The pattern at one frame size: a precomputed NV12 base plus drawing of
    the per-frame parts (box, OSD) into a frame in place."""

    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 2 or width < 2 * CELLS or height < BAND:
            raise ValueError(f"unsupported pattern size {width}x{height}")
        self.width, self.height = width, height
        self.frame_bytes = width * height * 3 // 2
        self.base = self._render_base()
        self.base.setflags(write=False)
        # OSD geometry
        self._cell_of_x = (np.arange(width) * CELLS) // width
        self._code_rows = [_band_rows(height, r, r + 1) for r in range(CODE_ROWS)]
        self._levels = np.array([BLACK, WHITE], np.uint8)
        d0, d1 = _band_rows(height, *DIGIT_BANDS)
        scale = max(1, min((d1 - d0) // 9, width // (6 * 22)))
        self._glyphs = np.stack([
            np.kron(np.array([[int(b) for b in row] for row in _FONT[c]], np.uint8),
                    np.ones((scale, scale), np.uint8)) * (WHITE - BLACK) + BLACK
            for c in _FONT
        ])
        self._glyph_w = 5 * scale
        self._advance = 6 * scale
        self._digit_y = d0 + scale
        self._digit_x = 2 * scale
        # box: a square of 1/6 height in the bars area, even-aligned for 4:2:0
        self.box_size = max(2, _even(height / 6))
        self._box_y = _even(height * 0.55)

    # ---------------------------------------------------------------- base

    def _render_base(self) -> np.ndarray:
        w, h = self.width, self.height
        frame = np.empty(w * h * 3 // 2, np.uint8)
        y = frame[: w * h].reshape(h, w)
        uv = frame[w * h:].reshape(h // 2, w // 2, 2)
        y[:] = BLACK
        uv[:] = 128
        b0, b1 = _band_rows(h, *BARS_BANDS)
        b0, b1 = _even(b0), _even(b1)
        bar_of_x = (np.arange(w) * len(BARS_YUV)) // w
        bars = np.array(BARS_YUV, np.uint8)[bar_of_x]  # (w, 3)
        y[b0:b1] = bars[:, 0]
        uv[b0 // 2:b1 // 2, :, 0] = bars[0::2, 1]
        uv[b0 // 2:b1 // 2, :, 1] = bars[0::2, 2]
        ramp = np.linspace(BLACK, WHITE, w).round().astype(np.uint8)
        y[b1:] = ramp
        return frame

    def planes(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Y (h, w) and UV (h/2, w/2, 2) views of a flat NV12 frame."""
        w, h = self.width, self.height
        return (frame[: w * h].reshape(h, w),
                frame[w * h: w * h * 3 // 2].reshape(h // 2, w // 2, 2))

    # ---------------------------------------------------------------- per frame

    def box_rect(self, sensor_frame: int, fps: int, hflip: bool = False,
                 vflip: bool = False) -> tuple[int, int, int]:
        """(x, y, size) of the sliding box for a sensor frame number."""
        period = max(1, round(BOX_PERIOD_S * fps))
        travel = self.width - self.box_size
        x = _even(travel * (sensor_frame % period) / period)
        y = self._box_y
        if hflip:
            x = travel - x
        if vflip:
            y = self.height - self.box_size - y
        return x, y, self.box_size

    def draw_box(self, frame: np.ndarray, rect: tuple[int, int, int],
                 colour: tuple[int, int, int]) -> None:
        x, y, s = rect
        yp, uvp = self.planes(frame)
        yp[y:y + s, x:x + s] = colour[0]
        uvp[y // 2:(y + s) // 2, x // 2:(x + s) // 2] = colour[1:]

    def draw_osd(self, frame: np.ndarray, sequence: int, timestamp_ns: int) -> None:
        """Burn the counter and timestamp (blocks + digits) into ``frame``."""
        yp, uvp = self.planes(frame)
        us = timestamp_ns // 1000
        values = np.array([sequence & 0xFFFFFFFF, us & 0xFFFFFFFF,
                           (us >> 32) & 0xFFFFFFFF], np.uint64)
        rows = self._levels[_bits(values)][:, self._cell_of_x]  # (3, w)
        for (r0, r1), pix in zip(self._code_rows, rows):
            yp[r0:r1] = pix
        uvp[: (self._code_rows[-1][1] + 1) // 2] = 128
        text = f"{sequence & 0xFFFFFFFF:010d} {us / 1e6:.3f}"
        x, gy, gw = self._digit_x, self._digit_y, self._glyph_w
        gh = self._glyphs.shape[1]
        for ch in text:
            if x + gw > self.width:
                break
            yp[gy:gy + gh, x:x + gw] = self._glyphs[_GLYPH_INDEX[ch]]
            x += self._advance


@functools.lru_cache(maxsize=16)
def pattern(width: int, height: int) -> Pattern:
    """The (cached) pattern for a frame size."""
    return Pattern(width, height)


# ---------------------------------------------------------------- read-back

def read_row(y_plane: np.ndarray, row: int) -> int:
    """Decode OSD row ``row`` from a Y plane of any size (2-D array).

    Raises ValueError when the guards or check bits do not match."""
    y = np.asarray(y_plane)
    if y.ndim != 2:
        raise ValueError("expected a 2-D Y plane")
    h, w = y.shape
    r0, r1 = row * h / BAND, (row + 1) * h / BAND
    ya, yb = int(r0 + 0.3 * (r1 - r0)), int(np.ceil(r0 + 0.7 * (r1 - r0)))
    profile = y[ya:max(yb, ya + 1)].astype(np.float32).mean(axis=0)
    cw = w / CELLS
    cells = np.array([
        profile[int(c * cw + 0.3 * cw): max(int(np.ceil(c * cw + 0.7 * cw)), int(c * cw + 0.3 * cw) + 1)].mean()
        for c in range(CELLS)
    ])
    white = cells[[0, CELLS - 1]].mean()
    black = cells[[1, CELLS - 2]].mean()
    if white - black < 40:
        raise ValueError(f"no OSD row {row} (guard contrast {white - black:.0f})")
    bits = (cells > (white + black) / 2).astype(np.uint64)
    if list(bits[[0, 1, CELLS - 2, CELLS - 1]]) != [1, 0, 0, 1]:
        raise ValueError(f"OSD row {row}: bad guards")
    value = int((bits[2:34] << np.arange(31, -1, -1, dtype=np.uint64)).sum())
    expect = _bits(np.array([value], np.uint64))[0]
    if not np.array_equal(expect, bits.astype(np.intp)):
        raise ValueError(f"OSD row {row}: check bits mismatch")
    return value


def read_counter(y_plane: np.ndarray) -> int:
    """The frame counter burned into a frame (equals FrameInfo.sequence)."""
    return read_row(y_plane, 0)


def read_timestamp_us(y_plane: np.ndarray) -> int:
    """The burned-in capture time in µs (FrameInfo.timestamp_ns // 1000)."""
    return read_row(y_plane, 1) | (read_row(y_plane, 2) << 32)


def y_plane(nv12: bytes | memoryview | np.ndarray, width: int, height: int) -> np.ndarray:
    """The Y plane of a flat NV12 buffer as a (height, width) view."""
    return np.frombuffer(nv12, np.uint8, width * height).reshape(height, width)
