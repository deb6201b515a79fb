"""Full KV: no compression; the accuracy and speed reference every other method is measured against."""

from dataclasses import dataclass
from typing import ClassVar

from core.methods.base import Method


@dataclass
class FullKV(Method):
    name: ClassVar[str] = "fullkv"
