"""Per-layer sensitivity of a preset's model under each measure, on the untrained adapter.

    python bench/layer_probe.py --config bench-decoder            # SmolLM2 on tweets
    python bench/layer_probe.py --config bench                    # MiniLM on tweets

Prints, per layer l, the mean token norm S of its input h_l and output h_{l+1}, and the scores
of `fibecfed.layers.layer_sensitivity` ("gain", "relative_gain", "output_change") on the first
16 training samples, seed 0 (the same noise for every measure), with the layers each would
aggregate at the config's `method.layers.share`. docs/defaults.md quotes it.
"""

from __future__ import annotations

import argparse

import torch

from fibecfed.cli import quiet_libraries
from fibecfed.config import load_config
from fibecfed.encoding import collate
from fibecfed.layers import _layer_hidden_states, _mean_token_norm, layer_sensitivity, select_aggregation_layers, transformer_layers
from fibecfed.simulator import prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench-decoder")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    config = load_config(args.config, ["data.max_train_samples=200", "data.max_test_samples=50", *args.overrides])
    prepared = prepare(config)
    model = prepared.runner.loaded.model.eval()
    batch = collate(prepared.train, list(range(args.samples)), prepared.runner.pad_token_id)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        states = _layer_hidden_states(model, transformer_layers(model), embeds, batch["attention_mask"])
        sizes = [float(_mean_token_norm(h, batch["attention_mask"].bool())) for h in states]
    scores = {m: layer_sensitivity(model, batch, config.method.layers.noise_scale, torch.Generator().manual_seed(0), m)
              for m in ("gain", "relative_gain", "output_change")}
    print(f"{config.model.name}: {len(sizes) - 1} layers, {args.samples} samples of {config.data.name}")
    print("| layer | S in | S out | " + " | ".join(scores) + " |")
    print("|---|---|---|" + "---|" * len(scores))
    for layer in range(len(sizes) - 1):
        print(f"| {layer} | {sizes[layer]:.1f} | {sizes[layer + 1]:.1f} | "
              + " | ".join(f"{float(s[layer]):.3f}" for s in scores.values()) + " |")
    for measure, s in scores.items():
        print(f"{measure}: aggregates {select_aggregation_layers(s, config.method.layers.share, 'sensitivity')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
