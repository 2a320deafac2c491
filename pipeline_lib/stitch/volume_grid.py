"""How a volume is cut for blockwise work, and how per-unit label ids become global ids.

A *slab* is ``z_block`` consecutive slices; a *tile* is a yx block with a halo; a *block* is one slab x one
tile (what one job step holds in memory). The unit of 2D segmentation is one slice x one tile. Units are
ordered (slab, tile, z), so the pieces of one block (and of one batch of whole slabs) are one contiguous
range of global ids: global id = offset of the unit (running total of earlier units' counts) + local id.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np

from ..tiling import Block, block_grid


@dataclass(frozen=True)
class VolumeGrid:
    shape: tuple[int, int, int]
    tile: int
    halo: int
    z_block: int

    @cached_property
    def tiles(self) -> list[Block]:
        return block_grid(self.shape[1:], self.tile, self.halo)

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def n_slabs(self) -> int:
        return -(-self.shape[0] // self.z_block)

    def slab(self, s: int) -> tuple[int, int]:
        """The z range [z0, z1) of slab ``s``."""
        return s * self.z_block, min((s + 1) * self.z_block, self.shape[0])

    def slab_of(self, z: int) -> int:
        return z // self.z_block

    def block_name(self, s: int, t: int) -> str:
        return f"s{s:05d}_t{t:05d}"

    @cached_property
    def _by_index(self) -> dict[tuple[int, ...], int]:
        return {b.index: i for i, b in enumerate(self.tiles)}

    def neighbours(self, t: int) -> list[int]:
        """Tiles whose inner region this tile's halo reaches (8-neighbourhood incl. corners; none without halo)."""
        if self.halo <= 0:
            return []
        iy, ix = self.tiles[t].index
        out = (self._by_index.get((iy + dy, ix + dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
        return sorted(j for j in out if j is not None)

    def neighbour_pairs(self) -> Iterator[tuple[int, int]]:
        """Tile pairs (t1 < t2) whose halos reach into each other's inner region."""
        for i in range(self.n_tiles):
            for j in self.neighbours(i):
                if j > i:
                    yield i, j

    def evidence_reads(self, s: int, t: int, reach: int) -> set[tuple[int, int]]:
        """Blocks the stitching evidence of block (s, t) reads: the same tile in the slabs up to ``reach``
        slices below the slab, and the same slab in the higher-numbered neighbour tiles (each pair of tiles
        is matched by its lower tile)."""
        last = self.slab_of(min(self.shape[0], self.slab(s)[1] + reach) - 1)
        return {(s2, t) for s2 in range(s, last + 1)} | {(s, j) for j in self.neighbours(t) if j > t}

    def evidence_reads_range(self, start: int, stop: int, reach: int) -> np.ndarray:
        """Flat indices (slab * n_tiles + tile) of the blocks that ``evidence_reads`` gives for the blocks
        ``start .. stop - 1``, all at once (the DAG asks this for every edge job)."""
        flat = np.arange(start, stop, dtype=np.int64)
        s, t = np.divmod(flat, self.n_tiles)
        ny, nx = (max(b.index[k] for b in self.tiles) + 1 for k in (0, 1))
        iy, ix = np.divmod(t, nx)
        out = [flat]
        if self.halo > 0:
            for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # the neighbours with a higher tile number
                ok = (iy + dy < ny) & (ix + dx >= 0) & (ix + dx < nx)
                out.append(flat[ok] + dy * nx + dx)
        last = (np.minimum(self.shape[0], np.minimum((s + 1) * self.z_block, self.shape[0]) + reach) - 1
                ) // self.z_block
        for k in range(1, int((last - s).max(initial=0)) + 1):
            out.append(flat[last - s >= k] + k * self.n_tiles)
        return np.unique(np.concatenate(out))

    def slice_offsets(self, off: np.ndarray, t: int, z0: int, z1: int) -> np.ndarray:
        """The unit offsets of tile ``t`` for slices z0..z1-1 (which may span slabs)."""
        zs = np.arange(z0, z1)
        return off[zs // self.z_block, t, zs % self.z_block]

    def global_ids(self, raw: np.ndarray, off: np.ndarray, t: int, z0: int, shift: int = 0) -> np.ndarray:
        """Global ids (int64, minus ``shift``) of tile ``t``'s local pieces ``raw`` of slices z0.. (0 stays 0),
        with one int64 copy of the block."""
        out = raw.astype(np.int64)
        out += (self.slice_offsets(off, t, z0, z0 + len(raw)) - shift)[:, None, None]
        out[raw == 0] = 0
        return out

    def counts_array(self) -> np.ndarray:
        """Zeros of shape (n_slabs, n_tiles, z_block): pieces per unit (slices past the end stay 0)."""
        return np.zeros((self.n_slabs, self.n_tiles, self.z_block), dtype=np.int64)


def unit_offsets(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Offsets (same shape as ``counts``) so that unit (s, t, dz) owns ids offset+1 .. offset+count, and the
    number of ids including background 0."""
    flat = counts.ravel()
    off = np.concatenate([[0], np.cumsum(flat)[:-1]]).reshape(counts.shape)
    return off, int(flat.sum()) + 1



def unit_key(grid: VolumeGrid, s: int, t: int, dz: int) -> int:
    """Flat index of unit (slab, tile, dz): the order of the global ids (``unit_offsets(counts).ravel()``)."""
    return (s * grid.n_tiles + t) * grid.z_block + dz


@dataclass(frozen=True)
class LocalIds:
    """Compact ids over the units one job reads (``keys``: sorted unit keys with pieces, ``offsets``: their
    running totals), so that the job's evidence does not depend on blocks it never reads; ``to_global``
    turns them into global ids once every block's count is known (pass 3)."""
    keys: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_counts(cls, counts: dict[int, int]) -> "LocalIds":
        keys = np.array(sorted(k for k, n in counts.items() if n > 0), dtype=np.int64)
        n = np.array([counts[k] for k in keys], dtype=np.int64)
        return cls(keys, np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64))

    def offset(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, key))
        return int(self.offsets[i]) if i < len(self.keys) and self.keys[i] == key else 0

    def ids(self, grid: VolumeGrid, raw: np.ndarray, t: int, z0: int) -> np.ndarray:
        """Job-local ids (int64) of tile ``t``'s local pieces ``raw`` of slices z0.. (0 stays 0)."""
        zs = range(z0, z0 + len(raw))
        off = np.array([self.offset(unit_key(grid, z // grid.z_block, t, z % grid.z_block)) for z in zs],
                       dtype=np.int64)
        out = raw.astype(np.int64)
        out += off[:, None, None]
        out[raw == 0] = 0
        return out

    def to_global(self, ids: np.ndarray, global_offsets: np.ndarray) -> np.ndarray:
        """Global ids of job-local ``ids`` (> 0) given the flat global unit offsets of the whole volume."""
        ids = np.asarray(ids, np.int64)
        i = np.searchsorted(self.offsets, ids, side="left") - 1
        return global_offsets[self.keys[i]] + ids - self.offsets[i]
