"""The benchmark's reference models, made by our exporters: `python bench/models.py [--out bench/out/repo]`.

- mlp: FP32 [B, 256] -> 1024 -> 1024 -> 10
- cnn: FP32 [B, 3, 32, 32] -> conv 16 -> pool -> conv 32 -> pool -> 10
Each is written six times (same graph, same max_batch_size): `<name>` with dynamic batching,
`<name>_delay` with dynamic batching and a 2 ms max_queue_delay_microseconds, `<name>_nobatch`
without batching (one request per run), and for the adaptive queue delay (issue 15) `<name>_delay1ms`
(1 ms, adaptive: the default) and `<name>_delay1ms_fixed` (1 ms always waited out, as Triton does), and for
the GPU path `<name>_delay1ms_graphs` (1 ms adaptive, `optimization { cuda { graphs: true } }`: one CUDA graph per
batch-size bucket on a GPU, the same as `_delay1ms` on the CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from exporters.export import ExportSpec, export_torch

MAX_BATCH_SIZE = 64


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 16, 16, 16]
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 32, 8, 8]
            nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = {"mlp": (MLP, (256,)), "cnn": (SmallCNN, (3, 32, 32))}


def build(out: Path) -> None:
    torch.manual_seed(0)
    for name, (cls, shape) in MODELS.items():
        module = cls().eval()
        example = (torch.zeros(2, *shape),)
        variants = (
            ("", "dynamic_batching { }"),
            ("_delay", "dynamic_batching { max_queue_delay_microseconds: 2000 }"),
            ("_nobatch", ""),
            ("_delay1ms", "dynamic_batching { max_queue_delay_microseconds: 1000 }"),
            ("_delay1ms_fixed", "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"
             'parameters { key: "adaptive_queue_delay" value: { string_value: "false" } }'),
            ("_delay1ms_graphs", "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"
             "optimization { cuda { graphs: true } }"),
        )
        for suffix, extra in variants:
            spec = ExportSpec(["INPUT"], ["OUTPUT"], max_batch_size=MAX_BATCH_SIZE, atol=1e-4, extra_config=extra)
            export_torch(module, example, spec, out, name + suffix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "repo")
    args = parser.parse_args()
    build(args.out)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out}")


if __name__ == "__main__":
    main()
