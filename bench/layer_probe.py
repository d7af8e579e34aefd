"""Per-layer sensitivity of a preset's model under each measure, on the untrained adapter.

    python bench/layer_probe.py --config bench-decoder --out bench/results/layer-probe-smollm2.md
    python bench/layer_probe.py --config bench --out bench/results/layer-probe-minilm.md

Prints, per layer l, the mean token norm S of its input h_l and output h_{l+1}, and the scores
of `fibecfed.layers.layer_sensitivity` ("gain", "relative_gain", "output_change") on the first
16 training samples, seed 0 (the same noise for every measure), with the layers each would
aggregate at the config's `method.layers.share`; with --out, also into that file. docs/defaults.md
quotes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fibecfed import outputs
from fibecfed.cli import parse_args, quiet_libraries
from fibecfed.config import load_config
from fibecfed.encoding import collate
from fibecfed.layers import hidden_state_sizes, layer_sensitivity, select_aggregation_layers
from fibecfed.simulator import prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench-decoder")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parse_args(parser, argv)
    quiet_libraries()
    torch.set_num_threads(1)
    config = load_config(args.config, ["data.max_train_samples=200", "data.max_test_samples=50", *args.overrides])
    prepared = prepare(config)
    model = prepared.runner.loaded.model.eval()
    batch = collate(prepared.train, list(range(args.samples)), prepared.runner.pad_token_id, prepared.runner.loaded.device)
    sizes = hidden_state_sizes(model, batch).tolist()  # S_0 .. S_L
    scores = {m: layer_sensitivity(model, batch, config.method.layers.noise_scale, torch.Generator().manual_seed(0), m)
              for m in ("gain", "relative_gain", "output_change")}
    lines = [f"{config.model.name} ({args.config} preset): {len(sizes) - 1} layers, the untrained adapter, "
             f"{args.samples} samples of {config.data.name}; `python bench/layer_probe.py --config {args.config}`", "",
             "| layer | S in | S out | " + " | ".join(scores) + " |", "|---|---|---|" + "---|" * len(scores)]
    for layer in range(len(sizes) - 1):
        lines.append(f"| {layer} | {sizes[layer]:.1f} | {sizes[layer + 1]:.1f} | "
                     + " | ".join(f"{float(s[layer]):.3f}" for s in scores.values()) + " |")
    lines.append("")
    for measure, s in scores.items():
        lines.append(f"{measure}: aggregates {select_aggregation_layers(s, config.method.layers.share, 'sensitivity')}  ")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        outputs.atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
