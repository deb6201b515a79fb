"""AdaKV (Feng et al., arXiv 2407.11550): SnapKV's exact prefill and scores, with the layer's budget shared
across KV heads by score instead of split evenly (core/methods/adaptive.py)."""

from dataclasses import dataclass
from typing import ClassVar

from core.methods.snapkv import SnapKV


@dataclass
class AdaKV(SnapKV):
    """`--budget` is the mean number of tokens each KV head of a layer keeps."""

    name: ClassVar[str] = "adakv"
    head_budget: str = "adaptive"
