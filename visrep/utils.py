"""Tiny helpers shared across layers."""
from __future__ import annotations


def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 rounds): seeds per item / step / rank."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
