"""Prefix caching: full KV pages shared between requests through a hash chain of their tokens.

Page i of a sequence is named by hash(name of page i-1, its page_size tokens), so a name fixes
every token before and in the page; two requests with the same first N full pages of tokens
share those N pages. Only full pages whose tokens are all known and computed are registered;
pages are immutable once full (new tokens go to new pages), so sharing needs no copy.
Unreferenced cached pages stay until the allocator needs them (least recently used first).
"""

from __future__ import annotations

import hashlib
import struct as _struct

from .kv_cache import PageAllocator


def page_hashes(tokens: list[int], page_size: int, n_pages: int | None = None) -> list[bytes]:
    """Names of the first `n_pages` full pages (all full pages by default)."""
    n = len(tokens) // page_size if n_pages is None else n_pages
    out, prev = [], b""
    for i in range(n):
        chunk = tokens[i * page_size:(i + 1) * page_size]
        prev = hashlib.blake2b(prev + _struct.pack(f"<{len(chunk)}q", *chunk), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, enabled: bool = True):
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self._by_hash: dict[bytes, int] = {}
        self._by_page: dict[int, bytes] = {}
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found
        allocator.on_evict = self._evicted

    def __contains__(self, page: int) -> bool:
        return page in self._by_page

    def match(self, tokens: list[int]) -> list[int]:
        """Take a reference to each cached page that starts `tokens`. At least one token is left
        to compute (its logits are needed), so a fully cached prompt recomputes its last page."""
        if not self.enabled:
            return []
        usable = (len(tokens) - 1) // self.page_size
        pages = []
        for h in page_hashes(tokens, self.page_size, usable):
            page = self._by_hash.get(h)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            self.allocator.share(page)
        self.queries += len(tokens)
        self.hits += len(pages) * self.page_size
        return pages

    def register(self, tokens: list[int], pages: list[int], first: int, last: int) -> None:
        """Name pages first..last-1 of a sequence whose tokens fill them."""
        if not self.enabled or last <= first:
            return
        hashes = page_hashes(tokens, self.page_size, last)
        for i in range(first, last):
            h, page = hashes[i], pages[i]
            if h in self._by_hash or page in self._by_page:
                continue  # the same content is cached under another page, or the page has a name
            self._by_hash[h] = page
            self._by_page[page] = h

    def _evicted(self, page: int) -> None:
        h = self._by_page.pop(page, None)
        if h is not None:
            self._by_hash.pop(h, None)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @property
    def num_cached(self) -> int:
        return len(self._by_page)
