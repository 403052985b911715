"""A page-granular prefix index (radix tree) over token sequences, with LRU bookkeeping.

Each node holds one full page of tokens and where that page's KV lives: a
device page, a host page, or both. A prefix hit is the longest chain of nodes
matching the request's leading full pages. Nodes in use by a batch are locked
and never chosen for eviction: whether a node is locked is the page spec's answer
(its pages have holders, `hicache.pages.TierPages.held`), passed in as `is_locked`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence


@dataclass(eq=False)
class RadixNode:
    """One page of tokens and where its KV lives (None: not in that tier)."""

    key: tuple[int, ...]
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    device_page: int | None = None
    host_page: int | None = None
    last_use: int = 0

    def __repr__(self) -> str:
        return f"RadixNode(key={self.key!r}, device_page={self.device_page!r}, host_page={self.host_page!r})"


class RadixIndex:
    """Prefix index: match, insert, and LRU candidates for eviction."""

    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.root = RadixNode((), None)
        self._clock = itertools.count(1)

    def pages(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        """The full pages of ``tokens`` (a trailing partial page is not cacheable)."""
        p = self.page_size
        return [tuple(tokens[i:i + p]) for i in range(0, len(tokens) - len(tokens) % p, p)]

    def match(self, tokens: Sequence[int]) -> list[RadixNode]:
        """Nodes of the longest cached prefix of ``tokens`` (device or host resident); marks them used."""
        node, out = self.root, []
        now = next(self._clock)
        for key in self.pages(tokens):
            node = node.children.get(key)  # type: ignore[assignment]
            if node is None:
                break
            node.last_use = now
            out.append(node)
        return out

    def insert(self, tokens: Sequence[int]) -> tuple[list[RadixNode], list[RadixNode]]:
        """Ensure a node per full page of ``tokens``; returns (all nodes of the path, the new ones)."""
        node, path, new = self.root, [], []
        now = next(self._clock)
        for key in self.pages(tokens):
            child = node.children.get(key)
            if child is None:
                child = RadixNode(key, node)
                node.children[key] = child
                new.append(child)
            child.last_use = now
            path.append(child)
            node = child
        return path, new

    def nodes(self) -> Iterator[RadixNode]:
        """Every node except the root."""
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def device_candidates(self, is_locked: Callable[[RadixNode], bool]) -> list[RadixNode]:
        """Unlocked nodes holding a device page, least recently used first (leaves before parents)."""
        cands = [n for n in self.nodes() if n.device_page is not None and not is_locked(n)]
        return sorted(cands, key=lambda n: (n.last_use, bool(n.children)))

    def lru_device(self, is_locked: Callable[[RadixNode], bool]) -> RadixNode | None:
        """Least recently used unlocked node that holds a device page."""
        cands = self.device_candidates(is_locked)
        return cands[0] if cands else None

    def lru_host_leaf(self, is_locked: Callable[[RadixNode], bool]) -> RadixNode | None:
        """Least recently used unlocked leaf whose KV lives only on the host (safe to drop)."""
        cands = [n for n in self.nodes()
                 if not n.children and n.device_page is None and n.host_page is not None and not is_locked(n)]
        return min(cands, key=lambda n: n.last_use, default=None)

    def remove(self, node: RadixNode) -> None:
        """Drop a leaf that holds no page any more."""
        assert not node.children and node.device_page is None and node.host_page is None, node
        assert node.parent is not None
        del node.parent.children[node.key]
