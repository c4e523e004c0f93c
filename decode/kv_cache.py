"""The paged KV store: device page pools and the host-side page allocator.

Pool layout, per engine: `k, v: [layers, pages, page_size, kv_heads, head_dim]`, the layout the
ragged paged-attention kernel reads one layer of. With int8 / fp8 KV, `k_scale, v_scale:
[layers, pages, page_size, kv_heads]` float32 hold one scale per token per head.

The allocator hands out page ids and counts references: a page shared through the prefix cache
has one reference per sequence using it. A page whose count drops to zero goes back to the free
list, unless the prefix cache keeps it (then it is free to evict, least recently used first).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from pallax.model.config import ModelConfig

KV_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


@struct.dataclass
class PagePool:
    """Stacked: k, v [L, P, page_size, KVH, D]; or per layer (with unstacked weights): lists of L
    arrays [P, page_size, KVH, D]. Scales likewise without the last axis."""

    k: jax.Array | list
    v: jax.Array | list
    k_scale: jax.Array | list | None = None  # f32 (quantized KV only)
    v_scale: jax.Array | list | None = None

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (list, tuple))

    @property
    def buffers(self) -> tuple:
        return (self.k, self.v, self.k_scale, self.v_scale)

    def layer(self, i: int) -> "PagePool":
        """Layer i of a per-layer pool, as a pool of [P, page_size, KVH, D] arrays."""
        return PagePool(*(None if a is None else a[i] for a in self.buffers))

    def with_layer(self, i: int, layer: "PagePool") -> "PagePool":
        """A per-layer pool whose layer i is `layer` (the other layers' buffers unchanged)."""
        return PagePool(*(None if a is None else [*a[:i], x, *a[i + 1:]] for a, x in zip(self.buffers, layer.buffers)))

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0] if self.per_layer else self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[2]


def page_bytes(config: ModelConfig, page_size: int, kv_dtype: str) -> int:
    """Device bytes of one page across all layers (K and V, plus scales when quantized)."""
    dt = jnp.dtype(KV_DTYPES[kv_dtype])
    per_token = 2 * config.n_kv_heads * config.head_dim * dt.itemsize
    if kv_dtype in ("int8", "fp8"):
        per_token += 2 * config.n_kv_heads * 4
    return config.n_layers * page_size * per_token


def pages_for_budget(config: ModelConfig, page_size: int, kv_dtype: str, memory_fraction: float,
                     device=None) -> int:
    """How many pages fit in `memory_fraction` of the device's free memory."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"{device}: free memory is unknown; give num_pages explicitly")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return max(1, int(free * memory_fraction) // page_bytes(config, page_size, kv_dtype))


def create_pool(config: ModelConfig, num_pages: int, page_size: int, kv_dtype: str,
                per_layer: bool = False) -> PagePool:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages=}, {page_size=}")
    shape = (config.n_layers, num_pages, page_size, config.n_kv_heads, config.head_dim)
    dt = KV_DTYPES[kv_dtype]
    quantized = kv_dtype in ("int8", "fp8")
    if per_layer:
        zeros = lambda s, d: [jnp.zeros(s[1:], d) for _ in range(config.n_layers)]  # noqa: E731
    else:
        zeros = jnp.zeros
    scales = (zeros(shape[:-1], jnp.float32), zeros(shape[:-1], jnp.float32)) if quantized else ()
    return PagePool(zeros(shape, dt), zeros(shape, dt), *scales)


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Host-side page ids with reference counts and an LRU of evictable cached pages."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.on_evict: Callable[[int], None] | None = None  # the prefix cache forgets the page

    @property
    def num_free(self) -> int:
        """Pages that can be handed out now (free plus evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - self.num_free

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"need {n} pages, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                if self.on_evict is not None:
                    self.on_evict(page)
            self._refs[page] = 1
            out.append(page)
        return out

    def share(self, page: int) -> None:
        """One more reference to a page (a prefix-cache hit)."""
        if self._refs[page] == 0:
            self._evictable.pop(page, None)
        self._refs[page] += 1

    def release(self, pages: list[int], cached: Callable[[int], bool] = lambda p: False) -> None:
        """Drop one reference to each page; unreferenced pages return to the free list, or wait
        in the evictable LRU if the prefix cache holds them."""
        for page in pages:
            if self._refs[page] <= 0:
                raise RuntimeError(f"page {page} released more often than it was taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if cached(page):
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def forget(self, page: int) -> None:
        """An evictable page leaves the cache: it becomes plainly free."""
        if page in self._evictable:
            del self._evictable[page]
            self._free.append(page)
