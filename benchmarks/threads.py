"""Training-step time of the registry models at 1 and 2 torch threads (why ``--threads`` defaults to 1).

    .venv/bin/python benchmarks/threads.py [--steps 30] [--out benchmarks/results/threads.csv]

Prints a Markdown table of ms/step per (model, data shape, threads) and the ratio to one thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from quicktrain import models
from quicktrain.report import markdown_table, write_csv

CASES = [
    ("mlp", (1, 28, 28)),
    ("cnn", (1, 8, 8)),
    ("cnn", (1, 28, 28)),
    ("resnet20", (1, 28, 28)),
    ("mobilenetv2_tiny", (1, 28, 28)),
]


def step_ms(model_name: str, shape: tuple[int, int, int], threads: int, steps: int, batch: int) -> float:
    """Median wall milliseconds of one AdamW training step after a burn-in of 3 steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = models.get_model(model_name, num_classes=10, in_shape=shape)
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/threads.csv")
    args = parser.parse_args()
    rows = []
    for name, shape in CASES:
        one = step_ms(name, shape, 1, args.steps, args.batch_size)
        two = step_ms(name, shape, 2, args.steps, args.batch_size)
        rows.append([name, "x".join(map(str, shape)), f"{one:.1f}", f"{two:.1f}", f"{two / one:.2f}"])
    columns = ["model", "input", "ms/step 1 thread", "ms/step 2 threads", "2 threads / 1 thread"]
    print(markdown_table(columns, rows))
    write_csv(columns, rows, args.out)


if __name__ == "__main__":
    main()
