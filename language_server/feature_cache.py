"""Recently used images' features by content key, least recently used first out, under a byte budget.

Chat clients resend every image of a conversation on every turn. The gateway names each image by a
content key (its bytes plus everything that changes its features); features held here under that key
are neither encoded nor sent again, and the same key given to vLLM as the image's identity lets its
prefix cache reuse the KV blocks of earlier turns.
"""

from __future__ import annotations

from collections import OrderedDict

from transport.frames import ImageFeatures


class FeatureCache:
    """All methods run on the language server's event loop."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> ImageFeatures | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, item: ImageFeatures) -> None:
        """Keep `item` under `key`, evicting the least recently used; an item over the budget is not kept.

        A request that took features out keeps its own reference, so eviction never touches features in use.
        """
        if item.num_bytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.num_bytes -= old.num_bytes
        while self._items and self.num_bytes + item.num_bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.num_bytes -= evicted.num_bytes
        self._items[key] = item
        self.num_bytes += item.num_bytes
