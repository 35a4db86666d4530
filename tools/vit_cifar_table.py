"""The markdown table of the ViT measurement from runs/vit-cifar/*.jsonl (what has finished)."""

import json
from pathlib import Path

O = Path(__file__).resolve().parents[1] / "runs" / "vit-cifar"
rows = []
for name, label in (
    ("single-np1", "one process"),
    ("ist-np2", "IST, 2 processes"),
    ("local-sgd-np2", "local SGD, 2 processes"),
    ("ist-ends1-np2", "IST, 2 processes, first and last block shared (`--shared-ends 1`)"),
):
    f = O / f"{name}.jsonl"
    lines = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    if not lines:
        rows.append(f"| {label} | not started or no epoch yet | | | | |")
        continue
    accs = " / ".join(f"{x['test_accuracy']:.2f}" for x in lines)
    wall = sum(x["train_seconds"] for x in lines) / len(lines)
    cpu = sum(x["train_cpu_seconds"] for x in lines) / len(lines)
    rows.append(
        f"| {label} | {len(lines)} of 6 | {lines[-1]['test_accuracy']:.2f}% | {accs} | {wall:.0f} s | {cpu:.0f} s |"
    )
print(
    "| run | epochs done | test accuracy at the last | by epoch | wall s per epoch (training) | CPU s per epoch, rank 0 |"
)
print("| --- | --- | --- | --- | --- | --- |")
print("\n".join(rows))
