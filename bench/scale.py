"""Peak memory and bytes written per round against the number of devices (issue 10).

Each setting runs FibecFed in-process in a fresh subprocess (so its peak resident memory,
ru_maxrss, is its own) and reports the checkpoint + device-file bytes written each round
(Simulation.bytes_written) and the size of all device states on disk at the end (what an
in-memory design would hold). The model is generated, not downloaded: a BERT of MiniLM's width
(hidden 384, intermediate 1536) with 3 layers instead of 12 and MiniLM's tokenizer, LoRA r=8
on every linear: a device's state is about a quarter of a MiniLM one, and a round is fast on a
CPU. Data: 8 tweets a device (iid), 2 test tweets a device.

    PYTHONPATH=src python bench/scale.py            # table on stdout and in bench/results/scale.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (devices, devices per round, rounds): the same per-round work at 2, 100 and 1,000 devices;
# then 100 devices a round, at 100 devices (each takes part every round) and at 1,000 (state
# accumulates: 8 x 100 distinct devices), so the last two rows differ only in the device count.
SETTINGS = [(2, 2, 12), (100, 2, 12), (1000, 2, 12), (100, 100, 8), (1000, 100, 8)]
RESULTS = Path(__file__).resolve().parent / "results" / "scale.md"


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fibecfed.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def child(model_dir: str, devices: int, per_round: int, rounds: int, out: str) -> None:
    """One setting, in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    from fibecfed.config import load_config
    from fibecfed.simulator import DEVICES, Simulation

    overrides = [
        f"model.name={model_dir}", "model.max_length=32", "method=fibecfed", "partition.scheme=iid",
        f"partition.num_devices={devices}", f"data.max_train_samples={8 * devices}",
        f"data.max_test_samples={max(100, 2 * devices)}", f"federation.devices_per_round={per_round}",
        f"federation.rounds={rounds}", "federation.eval_every=4", "federation.eval_samples=100",
        "federation.device_eval_samples=2", "train.batch_size=8", "train.local_steps=1",
    ]
    started = time.perf_counter()
    sim = Simulation(load_config(None, overrides), out)
    sim.run()
    files = list((Path(out) / DEVICES).glob("*.pt"))
    print(json.dumps({
        "devices": devices, "per_round": per_round, "rounds": rounds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "bytes_per_round": sim.bytes_written,
        "device_files": len(files), "all_states_mb": sum(f.stat().st_size for f in files) / 1e6,
        "seconds": time.perf_counter() - started,
    }))


def table(results: list[dict]) -> str:
    base = results[0]
    base_bytes = sum(base["bytes_per_round"]) / len(base["bytes_per_round"])
    lines = [
        "| devices | per round | rounds | devices with state | all states on disk (MB) | peak RSS (MB) | x 2-device | "
        "written per round, mean (MB) | max (MB) | x 2-device | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mean = sum(r["bytes_per_round"]) / len(r["bytes_per_round"])
        lines.append(
            f"| {r['devices']} | {r['per_round']} | {r['rounds']} | {r['device_files']} | {r['all_states_mb']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {mean / 1e6:.2f} | "
            f"{max(r['bytes_per_round']) / 1e6:.2f} | {mean / base_bytes:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "DEVICES", "PER_ROUND", "ROUNDS", "OUT"))
    parser.add_argument("--settings", help="devices:per_round:rounds,... (default: the issue's)")
    args = parser.parse_args()
    if args.child:
        model, devices, per_round, rounds, out = args.child
        child(model, int(devices), int(per_round), int(rounds), out)
        return
    settings = SETTINGS if not args.settings else [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(model_dir)
        for devices, per_round, rounds in settings:
            out = Path(tmp) / f"run-{devices}-{per_round}"
            done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(devices), str(per_round),
                                   str(rounds), str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"setting {devices}/{per_round} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    text = table(results)
    note = (
        "\n\nFibecFed in-process (fibecfed.simulator + device_store), generated BERT of MiniLM width (hidden 384, "
        "3 layers, LoRA r=8 on every linear), 8 train tweets a device, federation.device_cache=32 (default), "
        "one CPU thread. Peak RSS: ru_maxrss of a fresh process per setting. Written: checkpoint.pt + device "
        "files per round. 'x 2-device': ratio to the first row.\n"
    )
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Scale: memory and bytes written per round\n\nCommand: `PYTHONPATH=src python bench/scale.py`\n\n"
                       + text + note)


if __name__ == "__main__":
    main()
