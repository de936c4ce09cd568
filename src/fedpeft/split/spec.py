"""The cut specification ``"a-b"`` and which part every adapter parameter belongs to.

With L transformer blocks, a cut ``a-b`` (0 <= a < b <= L) gives
bottom = embeddings + blocks [0, a), trunk = blocks [a, b), top = blocks [b, L) + final norm + head.
The activations crossing cut 1 are the input of block a, those crossing cut 2 the input of block b (the
output of block L-1 when b = L). Pure functions over names: no model, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PARTS = ("bottom", "trunk", "top")
CUT_SETTING = "method.options.cut"

_CUT = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class CutSpec:
    first: int
    """a: the trunk's first block (bottom = embeddings + blocks [0, a))."""
    second: int
    """b: the top's first block (trunk = blocks [a, b))."""

    def __str__(self) -> str:
        return f"{self.first}-{self.second}"

    def part_of_block(self, index: int) -> str:
        if index < self.first:
            return "bottom"
        return "trunk" if index < self.second else "top"


def parse_cut(text: str, setting: str = CUT_SETTING) -> CutSpec:
    """``"a-b"`` with integers 0 <= a < b; an error names the setting, the value and the expected form."""
    match = _CUT.match(str(text))
    if not match:
        raise ValueError(f"{setting}: '{text}' is not a cut; expected 'a-b' with block indices 0 <= a < b "
                         f"(e.g. '2-26': bottom = embeddings + blocks 0-1, top = blocks 26.. + norm + head)")
    first, second = int(match.group(1)), int(match.group(2))
    if first >= second:
        raise ValueError(f"{setting}: '{text}' has a >= b; expected a < b so the trunk holds at least one block")
    return CutSpec(first, second)


def check_cut(spec: CutSpec, num_blocks: int, setting: str = CUT_SETTING) -> CutSpec:
    """The cut fits a model of ``num_blocks`` blocks: b <= L (a < b was checked when parsed)."""
    if spec.second > num_blocks:
        raise ValueError(f"{setting}: '{spec}' is outside the model's layers: it has {num_blocks} blocks, so a cut "
                         f"'a-b' needs 0 <= a < b <= {num_blocks}")
    return spec


def block_index(key: str, blocks_prefix: str) -> int | None:
    """The block index of a parameter named under ``blocks_prefix`` ("...layers.3.self_attn..." -> 3)."""
    head = blocks_prefix + "."
    if not key.startswith(head):
        return None
    return int(key[len(head):].split(".", 1)[0])


def part_of_key(key: str, blocks_prefix: str, spec: CutSpec) -> str:
    """bottom / trunk / top of one adapter key. Outside the blocks: anything under an embedding module
    is bottom, everything else (final norm, pooler, LM head, classifier head) is top."""
    index = block_index(key, blocks_prefix)
    if index is not None:
        return spec.part_of_block(index)
    return "bottom" if "embed" in key else "top"


def split_keys(keys: Iterable[str], blocks_prefix: str, spec: CutSpec) -> dict[str, list[str]]:
    """part -> its keys, in the order given (every part present, possibly empty)."""
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for key in keys:
        parts[part_of_key(key, blocks_prefix, spec)].append(key)
    return parts
