"""The document model: an ordered list of text and image items.

Every data source (image-text pairs, MMC4 documents, the embedded corpus)
becomes documents before it becomes token ids. In a shard a document is a
JSON object `{"items": [{"text": "..."}, {"image": "NAME"}, ...]}` whose
image items name files of the same webdataset sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    """An image of the document; `name` is the file (sample extension) holding its bytes."""

    name: str


@dataclass
class Document:
    items: list = field(default_factory=list)  # Text and Image, in reading order

    @property
    def images(self) -> list[Image]:
        return [item for item in self.items if isinstance(item, Image)]

    def to_json(self) -> str:
        return json.dumps({"items": [
            {"text": item.text} if isinstance(item, Text) else {"image": item.name} for item in self.items
        ]}, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json_obj(cls, obj) -> "Document":
        """Parse the shard form; raise ValueError naming what is wrong."""
        if not isinstance(obj, dict) or not isinstance(obj.get("items"), list):
            raise ValueError("document JSON needs an 'items' list")
        items = []
        for entry in obj["items"]:
            if isinstance(entry, dict) and isinstance(entry.get("text"), str) and "image" not in entry:
                items.append(Text(entry["text"]))
            elif isinstance(entry, dict) and isinstance(entry.get("image"), str) and "text" not in entry:
                items.append(Image(entry["image"]))
            else:
                raise ValueError(f"document item {entry!r} is neither {{'text': str}} nor {{'image': str}}")
        return cls(items)
