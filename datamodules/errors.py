"""The exception an injected sample encoder raises for a sample that must not train (counted, never fatal)."""

from __future__ import annotations


class SkipSample(Exception):
    """A sample that must not train; ``kind`` names the counter it goes to (``corrupt_image``, ``too_long``)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
