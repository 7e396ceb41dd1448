"""Bit packing: small non-negative integers stored at exactly ``bits`` bits each.

Codebook labels in ``0..k-1`` need ``ceil(log2 k)`` bits; a checkpoint stores them packed
into a 1-D ``uint8`` tensor of ``ceil(n * bits / 8)`` bytes. Value ``i`` occupies bits
``i*bits .. (i+1)*bits - 1`` of the stream, least significant bit first (within each byte
too), so the layout is the same on every machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SharingError

__all__ = ["bits_for", "packed_size", "pack_bits", "unpack_bits"]

_CHUNK = 1 << 18  # values per chunk of the generic path (a multiple of 8: whole bytes)


def bits_for(k: int) -> int:
    """Bits per label for ``k`` clusters: ``ceil(log2 k)`` (0 for a single cluster).

    Example:
        >>> [bits_for(k) for k in (1, 2, 3, 16, 17, 256)]
        [0, 1, 2, 4, 5, 8]
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SharingError(f"the number of clusters must be a positive integer, got {k!r}")
    return (k - 1).bit_length()


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` values take at ``bits`` bits each: ``ceil(n * bits / 8)``."""
    return math.ceil(n * bits / 8)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 32:
        raise SharingError(f"bits must be an integer from 0 to 32, got {bits!r}")
    return bits


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a 1-D uint8 tensor (CPU).

    Args:
        values: an integer tensor of any shape (flattened in row-major order).
        bits: bits per value, 0 to 32 (0: every value must be 0; nothing is stored).

    Returns:
        A uint8 tensor of ``ceil(values.numel() * bits / 8)`` bytes; unused high bits of
        the last byte are zero.

    Raises:
        SharingError: a non-integer tensor, or a value outside ``0 .. 2**bits - 1``.

    Example:
        >>> import torch
        >>> p = pack_bits(torch.tensor([1, 2, 3, 0, 15]), 4)
        >>> p.tolist(), unpack_bits(p, 4, 5).tolist()
        ([33, 3, 15], [1, 2, 3, 0, 15])
    """
    bits = _check_bits(bits)
    if not isinstance(values, torch.Tensor) or values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise SharingError(f"pack_bits needs an integer tensor, got {getattr(values, 'dtype', type(values).__name__)}")
    v = values.detach().reshape(-1).cpu()
    n = v.numel()
    if n:
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi >= (1 << bits):
            bad = lo if lo < 0 else hi
            raise SharingError(f"cannot pack {bad} in {bits} bits: values must be in 0..{(1 << bits) - 1}")
    if bits == 0 or n == 0:
        return torch.zeros(packed_size(n, bits), dtype=torch.uint8)
    a = v.numpy()
    if bits == 8:
        return torch.from_numpy(a.astype(np.uint8))
    if bits in (1, 2, 4):
        per = 8 // bits
        a8 = a.astype(np.uint8)
        pad = (-n) % per
        if pad:
            a8 = np.concatenate((a8, np.zeros(pad, dtype=np.uint8)))
        a8 = a8.reshape(-1, per)
        out = a8[:, 0].copy()
        for j in range(1, per):
            out |= a8[:, j] << np.uint8(j * bits)
        return torch.from_numpy(out)
    if bits == 16:
        return torch.from_numpy(a.astype("<u2").view(np.uint8).copy())
    out = np.empty(packed_size(n, bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint32)
    a32 = a.astype(np.uint32)
    for start in range(0, n, _CHUNK):
        chunk = a32[start:start + _CHUNK]
        bitmat = ((chunk[:, None] >> shifts) & np.uint32(1)).astype(np.uint8)
        packed = np.packbits(bitmat.reshape(-1), bitorder="little")
        pos = start * bits // 8
        out[pos:pos + packed.size] = packed
    return torch.from_numpy(out)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` values that :func:`pack_bits` stored at ``bits`` bits each, as int64 (CPU).

    Args:
        packed: the 1-D uint8 tensor (on any device).
        bits: bits per value, 0 to 32.
        n: how many values it holds.

    Returns:
        A 1-D int64 tensor of ``n`` values.

    Raises:
        SharingError: ``packed`` is not 1-D uint8 or its size is not ``ceil(n * bits / 8)``.

    Example:
        >>> import torch
        >>> unpack_bits(pack_bits(torch.arange(5), 3), 3, 5).tolist()
        [0, 1, 2, 3, 4]
    """
    bits = _check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SharingError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        what = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise SharingError(f"packed labels must be a 1-D uint8 tensor, got {what}")
    want = packed_size(n, bits)
    if packed.numel() != want:
        raise SharingError(
            f"packed labels hold {packed.numel()} bytes but {n} values at {bits} bits need {want}; the data is corrupt "
            "or belongs to another tensor"
        )
    if bits == 0 or n == 0:
        return torch.zeros(n, dtype=torch.int64)
    a = packed.detach().cpu().numpy()
    if bits == 8:
        return torch.from_numpy(a.astype(np.int64))
    if bits in (1, 2, 4):
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        cols = [(a >> np.uint8(j * bits)) & mask for j in range(per)]
        out = np.stack(cols, axis=1).reshape(-1)[:n]
        return torch.from_numpy(out.astype(np.int64))
    if bits == 16:
        return torch.from_numpy(a.view("<u2").astype(np.int64))
    out = np.empty(n, dtype=np.int64)
    weights = (np.int64(1) << np.arange(bits, dtype=np.int64))
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        pos = start * bits // 8
        nbytes = packed_size(count, bits)
        bitvec = np.unpackbits(a[pos:pos + nbytes], bitorder="little", count=count * bits)
        out[start:start + count] = bitvec.reshape(count, bits).astype(np.int64) @ weights
    return torch.from_numpy(out)
