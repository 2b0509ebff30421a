"""KV cache: preallocated per-layer key/value storage for a fixed number of sequence slots.

Global-attention layers keep `capacity` positions. Sliding-window layers keep only `window`
positions in a ring buffer (position p lives at index p % window), so their memory is bounded by
the window however long the sequence grows. The cache is plain storage plus slot bookkeeping; the
model decides what to write where (see model.Model._attention_plan).
"""

from __future__ import annotations

import torch

from openlpu.errors import OpenLPUError
from openlpu.models.spec import ModelSpec


def ring_positions(length: int, capacity: int, device=None) -> torch.Tensor:
    """The token position held at each index of a ring of `capacity` after `length` writes.

    Index i holds the newest position p < length with p % capacity == i; -1 where nothing was
    written yet. For a ring that never wrapped (length <= capacity) index i holds position i.
    """
    index = torch.arange(capacity, device=device)
    return (length - 1) - torch.remainder(length - 1 - index, capacity)


class KVCache:
    def __init__(self, spec: ModelSpec, n_slots: int, capacity: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if n_slots < 1 or capacity < 1:
            raise OpenLPUError(f"KV cache needs at least one slot and one position "
                               f"(got {n_slots} slots, {capacity} positions)")
        self.capacity = capacity
        # per layer: positions kept (the ring size for sliding-window and chunked layers)
        self.layer_capacity = [spec.layer_positions(i, capacity) for i in range(spec.n_layers)]
        # torch.empty: memory is only touched as sequences grow, and no entry is ever read before
        # it is written (the model attends to written positions only).
        shape = lambda c: (n_slots, spec.n_kv_heads, c, spec.head_dim)  # noqa: E731
        self.k = [torch.empty(shape(c), device=device, dtype=dtype) for c in self.layer_capacity]
        self.v = [torch.empty(shape(c), device=device, dtype=dtype) for c in self.layer_capacity]
        self.first_slot = [0] * spec.n_layers  # per layer, the ring slot its storage starts at (a part's)
        self.lengths = [0] * n_slots  # tokens written per slot (= next position)
        self._free = list(range(n_slots - 1, -1, -1))
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def slot(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's keys and values for one layer, [kv heads, positions, head_dim] each: views,
        made once (a decode step would otherwise index them out again in every layer)."""
        views = self._views.get((layer, slot))
        if views is None:
            views = self._views[(layer, slot)] = (self.k[layer][slot], self.v[layer][slot])
        return views

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def allocate(self) -> int:
        if not self._free:
            raise OpenLPUError(f"all {self.n_slots} KV cache slots are in use; release a "
                               "sequence first or load the engine with a larger max_batch")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise OpenLPUError(f"KV cache slot {slot} is not in use")
        self.lengths[slot] = 0
        self._free.append(slot)
