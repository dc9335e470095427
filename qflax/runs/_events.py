"""TensorBoard event files without TensorFlow: scalars (and histograms) of a run written in
TensorBoard's format — TFRecord framing (length, masked CRC-32C, data, masked CRC-32C) around
``Event`` protocol buffers encoded here by hand — and read back by :func:`read_scalars`.

``EventWriter(directory)`` appends to ``events.out.tfevents.<time>.<host>.<pid>.qflax`` in that
directory; TensorBoard (``tensorboard --logdir WORKDIR``) shows every tag as a curve over steps.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["EventWriter", "read_scalars", "crc32c"]

# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78: the checksum of TFRecord framing.
_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data``.

    >>> hex(crc32c(b"123456789"))  # the standard check value
    '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _histogram(values: np.ndarray) -> bytes:
    """A ``HistogramProto``: min, max, num, sum, sum_squares, bucket limits and counts."""
    values = np.asarray(values, np.float64).ravel()
    counts, edges = np.histogram(values, bins=30)
    packed = lambda xs: b"".join(struct.pack("<d", float(x)) for x in xs)  # noqa: E731
    return (
        _field(1, 1, struct.pack("<d", values.min()))
        + _field(2, 1, struct.pack("<d", values.max()))
        + _field(3, 1, struct.pack("<d", values.size))
        + _field(4, 1, struct.pack("<d", values.sum()))
        + _field(5, 1, struct.pack("<d", float(np.sum(values * values))))
        + _length_delimited(6, packed(edges[1:]))
        + _length_delimited(7, packed(counts))
    )


def _event(step: int, wall_time: float, *, values: bytes = b"", file_version: str = "") -> bytes:
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        out += _length_delimited(3, file_version.encode())
    if values:
        out += _length_delimited(5, values)
    return out


class EventWriter:
    """Appends scalar and histogram summaries to one event file in ``directory``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.qflax"
        self.path = self.directory / name
        self._file = self.path.open("ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked(header)))
        self._file.write(data + struct.pack("<I", _masked(data)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One ``simple_value`` per tag at ``step`` (non-numbers are skipped)."""
        body = b""
        for tag, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            entry = _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
            body += _length_delimited(1, entry)
        if body:
            self._write(_event(int(step), time.time(), values=body))

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        """The histogram of ``values`` (30 bins) under ``tag`` at ``step``."""
        values = np.asarray(values)
        if values.size == 0 or not np.all(np.isfinite(values)):
            return
        entry = _length_delimited(1, tag.encode()) + _length_delimited(5, _histogram(values))
        self._write(_event(int(step), time.time(), values=_length_delimited(1, entry)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _records(path: pathlib.Path) -> Iterator[bytes]:
    data = path.read_bytes()
    at = 0
    while at + 12 <= len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[at + 8 : at + 12])[0] != _masked(header):
            raise ValueError(f"{path}: bad length checksum at byte {at}")
        body = data[at + 12 : at + 12 + length]
        (crc,) = struct.unpack("<I", data[at + 12 + length : at + 16 + length])
        if crc != _masked(body):
            raise ValueError(f"{path}: bad data checksum at byte {at}")
        yield body
        at += 16 + length


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
        elif wire == 1:
            value, at = data[at : at + 8], at + 8
        elif wire == 5:
            value, at = data[at : at + 4], at + 4
        elif wire == 2:
            length, at = _read_varint(data, at)
            value, at = data[at : at + length], at + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def read_scalars(directory: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``directory``: ``{tag: [(step, value), ...]}`` in
    file order (checksums verified)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
        for record in _records(path):
            step, summary = 0, b""
            for number, _, value in _fields(record):
                if number == 2:
                    step = value
                elif number == 5:
                    summary = value
            for number, _, value in _fields(summary):
                if number != 1:
                    continue
                tag, simple = None, None
                for n, _, v in _fields(value):
                    if n == 1:
                        tag = v.decode()
                    elif n == 2:
                        simple = struct.unpack("<f", v)[0]
                if tag is not None and simple is not None:
                    out.setdefault(tag, []).append((int(step), simple))
    return out
