"""Regular grids of blocks with halos, for 2D tiles and nD blocks alike."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Iterator, Sequence


@dataclass(frozen=True)
class Block:
    """One block of a grid: ``inner`` is what the block owns, ``outer`` adds the halo (clipped)."""

    index: tuple[int, ...]
    inner: tuple[slice, ...]
    outer: tuple[slice, ...]

    @property
    def inner_local(self) -> tuple[slice, ...]:
        """The inner region in coordinates of the outer region."""
        return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(self.inner, self.outer))

    @property
    def inner_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.inner)

    @property
    def outer_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.outer)


def _as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"expected {ndim} values, got {value}")
    return value


def grid_shape(shape: Sequence[int], block: int | Sequence[int]) -> tuple[int, ...]:
    block = _as_tuple(block, len(shape))
    return tuple(max(1, -(-s // b)) for s, b in zip(shape, block))


def block_grid(shape: Sequence[int], block: int | Sequence[int],
               halo: int | Sequence[int] = 0) -> list[Block]:
    """All blocks of ``shape`` in C order; a dimension smaller than the block is a single block."""
    ndim = len(shape)
    block = _as_tuple(block, ndim)
    halo = _as_tuple(halo, ndim)
    blocks = []
    for idx in product(*(range(n) for n in grid_shape(shape, block))):
        inner = tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(idx, block, shape))
        outer = tuple(slice(max(sl.start - h, 0), min(sl.stop + h, s)) for sl, h, s in zip(inner, halo, shape))
        blocks.append(Block(idx, inner, outer))
    return blocks


def face_pairs(blocks: Sequence[Block]) -> Iterator[tuple[Block, Block, int]]:
    """Pairs of blocks that share a face, with the axis of the face (lower block first)."""
    by_index = {b.index: b for b in blocks}
    for b in blocks:
        for axis in range(len(b.index)):
            nb = list(b.index)
            nb[axis] += 1
            other = by_index.get(tuple(nb))
            if other is not None:
                yield b, other, axis
