"""Where the blocks and input embeddings of a (PEFT-wrapped) model are.

Decoders (Llama / SmolLM2: ``model.layers``) and encoders (BERT / MiniLM: ``bert.encoder.layer``) both
keep their transformer blocks in one ``nn.ModuleList``; names are those of ``model.named_modules()`` so they
match the adapter keys of the same (wrapped) model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BLOCK_LISTS = ("layers", "encoder.layer", "h", "blocks")


@dataclass(frozen=True)
class Layout:
    blocks_prefix: str
    """Module name of the block list, e.g. ``base_model.model.model.layers``."""
    blocks: torch.nn.ModuleList
    embeddings: torch.nn.Module
    """The input token embeddings (``get_input_embeddings``): where d_chi-privacy noise is added."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def find_layout(model: torch.nn.Module) -> Layout:
    """The model's transformer-block list and input embeddings; a clear error when there is none."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) > 0
             and any(name == suffix or name.endswith("." + suffix) for suffix in _BLOCK_LISTS)]
    if not found:
        raise ValueError(f"split learning: {type(model).__name__} has no transformer block list "
                         f"(looked for a ModuleList named one of {', '.join(_BLOCK_LISTS)})")
    name, blocks = max(found, key=lambda item: len(item[1]))
    return Layout(blocks_prefix=name, blocks=blocks, embeddings=model.get_input_embeddings())
