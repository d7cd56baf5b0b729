"""learn2learn's examples/metamodule_toy.py: MetaModule appends a LayerNorm to every Linear
and swaps ReLU for GELU, freezing the original parameters."""

import torch

import fastmeta.l2l.nn.metalayers as ml

L2L_CALLS = ["l2l.nn.metalayers.MetaModule"]


def main():
    original = torch.nn.Sequential(
        torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10), torch.nn.ReLU(),
    )
    wrapped = ml.MetaModule(
        module=original,
        substitutions={
            torch.nn.Linear: lambda linear: torch.nn.Sequential(linear, torch.nn.LayerNorm(linear.in_features)),
            torch.nn.ReLU: lambda relu: torch.nn.GELU(),
        },
        freeze_module=True,
    )
    return wrapped, {name: param.requires_grad for name, param in wrapped.named_parameters()}
