"""The FLOPs rules as stated in fedpeft.metering.flops."""

from __future__ import annotations

import torch

from fedpeft.metering.flops import count_parameters, forward_flops, full_training_flops, lora_training_flops


def test_rules():
    assert full_training_flops(1000, 10) == 6 * 1000 * 10
    assert lora_training_flops(1000, 10, 2) == 1000 * (4 * 10 + 6 * 2)
    assert forward_flops(7, 3) == 42
    # a LoRA step is cheaper than full fine-tuning of the same base, dearer than inference
    assert forward_flops(1, 100) < lora_training_flops(1, 100, 1) < full_training_flops(1, 101)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)  # 20 frozen
        self.lora = torch.nn.Linear(4, 2, bias=False)  # 8 trainable
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: counted once
        for p in (*self.embed.parameters(), *self.proj.parameters()):
            p.requires_grad_(False)

    def get_input_embeddings(self):
        return self.embed


def test_count_parameters():
    model = Tiny()
    assert count_parameters(model) == (20, 8)
    assert count_parameters(model, exclude_embeddings=False) == (60, 8)
