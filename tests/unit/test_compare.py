import json

import pytest

from fibecfed.compare import first_reaching, markdown_table, parse_methods, smoothed, summarise
from fibecfed.errors import ConfigError


def rows(accs, sim_step=10.0, up_step=100):
    return [
        {"round": i, "accuracy": a, "sim_time_s": i * sim_step, "wall_time_s": i * 2.0, "upload_bytes": i * up_step,
         "personalized_accuracy": None if i == 0 else 0.5}
        for i, a in enumerate(accs)
    ]


def test_smoothed_is_trailing_mean_of_three():
    assert smoothed([0.3, 0.6, 0.9, 0.0]) == pytest.approx([0.3, 0.45, 0.6, 0.5])
    assert smoothed([0.3, None, 0.6]) == [0.3, None, pytest.approx(0.45)]


def test_a_lucky_round_does_not_reach_the_target():
    # round 2 spikes to 0.9 but the mean of rounds 0..2 is 0.5: the target 0.6 is not reached there
    accs = [0.3, 0.3, 0.9, 0.5, 0.6, 0.7]
    hit = first_reaching(rows(accs), 0.6)
    # smoothed: 0.3, 0.3, 0.5, 0.567, 0.667 -> round 4
    assert hit["round"] == 4
    assert first_reaching(rows(accs), 0.95) is None


def test_summarise_ratios_by_hand():
    runs = {
        "fedavg": [rows([0.3, 0.5, 0.6, 0.7, 0.7])],  # smoothed: .3 .4 .467 .6 .667 -> reaches 0.6 at round 3
        "fast": [rows([0.3, 0.7, 0.7, 0.7, 0.7], sim_step=5.0, up_step=25)],  # .3 .5 .567 .7 -> round 3
    }
    table = summarise(runs, 0.6, "fedavg")
    assert table["fedavg"]["round_to_target"] == 3
    assert table["fedavg"]["sim_time_to_target_s"] == 30.0
    assert table["fast"]["sim_time_to_target_s"] == 15.0
    assert table["fast"]["sim_time_to_target_s_ratio"] == pytest.approx(0.5)
    assert table["fast"]["upload_bytes_to_target_ratio"] == pytest.approx(0.25)
    assert table["fast"]["final_accuracy_ratio"] == pytest.approx(1.0)
    md = markdown_table(table, 0.6, "fedavg")
    assert "| fast |" in md and "0.50" in md


def test_paired_ratios_use_the_seeds_both_reached():
    runs = {
        # seed 0: reference reaches at round 3 (30 s), seed 1: never; "m" reaches in both.
        "fedavg": [rows([0.3, 0.5, 0.6, 0.7, 0.7]), rows([0.3, 0.3, 0.3, 0.3, 0.3])],
        "m": [rows([0.3, 0.7, 0.7, 0.7, 0.7], sim_step=5.0, up_step=25), rows([0.3, 0.7, 0.7, 0.7, 0.7])],
    }
    table = summarise(runs, 0.6, "fedavg")
    assert table["m"]["sim_time_to_target_s_ratio"] is None  # not every seed of the reference reached
    assert table["m"]["sim_time_to_target_s_paired_ratios"] == [pytest.approx(0.5)]  # 15 s / 30 s, seed 0 only
    assert table["m"]["upload_bytes_to_target_paired_ratios"] == [pytest.approx(0.25)]
    assert table["fedavg"]["sim_time_to_target_s_paired_ratios"] == [pytest.approx(1.0)]


def test_mean_and_spread_over_seeds():
    runs = {"m": [rows([0.3, 0.6]), rows([0.3, 0.8])]}
    entry = summarise(runs, 0.99, "m")["m"]
    assert entry["final_accuracy"] == pytest.approx(0.7)
    assert entry["final_accuracy_std"] == pytest.approx(0.1)
    assert entry["reached"] == 0 and entry["sim_time_to_target_s"] is None


def test_parse_methods():
    specs = parse_methods("fedavg,fibecfed[method.layers.share=0.33;method.sparse.share=0.2],fibecfed-no-curriculum")
    assert [s.label for s in specs][0] == "fedavg"
    assert specs[1].overrides[-2:] == ["method.layers.share=0.33", "method.sparse.share=0.2"]
    assert "method.curriculum.enabled=false" in specs[2].overrides
    with pytest.raises(ConfigError, match="unknown method"):
        parse_methods("fedsgd")
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("fedavg,fedavg")


def test_compare_end_to_end_on_tiny_model(tiny_encoder_dir, tmp_path):
    from fibecfed.compare import compare
    from tests.conftest import tiny_run_overrides

    result = compare(
        parse_methods("fedavg,fibecfed"), [0, 1], tmp_path, overrides=tiny_run_overrides(tiny_encoder_dir, 2), target=0.0
    )
    for name in ("comparison.json", "comparison.md", "comparison.png", "fedavg/seed0/metrics.jsonl", "fibecfed/seed1/summary.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["methods"]["fedavg"]["seeds"] == 2
    assert saved["methods"]["fedavg"]["upload_bytes_to_target_ratio"] == pytest.approx(1.0)
    # FibecFed sends half the layers: less than FedAvg to reach the same (trivial) target.
    assert result["methods"]["fibecfed"]["upload_bytes_to_target_ratio"] < 0.7
    # Contract with the simulator: its per-device costs add up to its own simulated time.
    for label in ("fedavg", "fibecfed"):
        assert saved["methods"][label]["device_costs_seeds"] == 2
        assert saved["methods"][label]["sweep_mismatch_s"] < 0.01, label
    assert (tmp_path / "bandwidth.png").is_file()


def test_round_breakdown_by_hand():
    from fibecfed.compare import round_breakdown

    # Two devices per round; each round moves 2.5 MB down and 2.5 MB up in total, i.e. 2.5 MB
    # per device = 2.0 s at 10 Mbps; rounds last 5 s and 7 s, so compute is 3 s and 5 s.
    base = {"devices": [0, 1], "failed_devices": []}
    history = [
        {"round": 0, "sim_time_s": 0.0, "upload_bytes": 0, "download_bytes": 0},
        {**base, "round": 1, "sim_time_s": 5.0, "upload_bytes": 2_500_000 // 2, "download_bytes": 2_500_000 // 2 * 3,
         "scoring_seconds": 1.0, "curriculum_fraction": 0.2},
        {**base, "round": 2, "sim_time_s": 12.0, "upload_bytes": 2_500_000, "download_bytes": 7_500_000,
         "scoring_seconds": 0.0, "curriculum_fraction": 0.6},
    ]
    b = round_breakdown(history, 10.0)
    assert b["round_sim_s"] == pytest.approx(6.0)
    assert b["round_transfer_s"] == pytest.approx(2.0)
    assert b["round_compute_s"] == pytest.approx(4.0)
    assert b["round_scoring_s"] == pytest.approx(0.25)  # (1.0 / 2 devices + 0) / 2 rounds
    assert b["round_device_upload_bytes"] == pytest.approx(625_000)
    assert b["round_curriculum_fraction"] == pytest.approx(0.4)
    assert round_breakdown(history[:1], 10.0) == {}
    assert "round_probe_s" not in b  # rows from before the simulator recorded the probes
    probed = [history[0], {**history[1], "probe_seconds": 0.5}, {**history[2], "probe_seconds": 0.0}]
    assert round_breakdown(probed, 10.0)["round_probe_s"] == pytest.approx(0.125)  # (0.5 / 2 devices + 0) / 2 rounds


# --- personalised score, compute-only time, bandwidth sweep --------------------------------------

MB = 1_250_000  # bytes that take exactly 1 s at 10 Mbit/s (1.25e6 * 8 bits / 1e7 bit/s)


def test_round_time_is_the_slowest_device_at_that_speed():
    from fibecfed.compare import round_time_at_bandwidth

    # [compute s, download bytes, upload bytes]: the compute-heavy device is slowest on a fast link,
    # the byte-heavy one on a slow link.
    costs = [[2.0, 0, 0], [0.0, 2 * MB, 0]]
    assert round_time_at_bandwidth(costs, 10.0) == pytest.approx(2.0)  # 2 s vs 2 MB-units = 2 s
    assert round_time_at_bandwidth(costs, 1.0) == pytest.approx(20.0)  # 2 s vs 20 s
    assert round_time_at_bandwidth(costs, float("inf")) == pytest.approx(2.0)
    assert round_time_at_bandwidth([], 10.0) == 0.0


def test_sim_time_at_bandwidth_by_hand():
    from fibecfed.compare import sim_time_at_bandwidth

    history = [
        {"round": 0, "device_costs": [[2.0, 0, 0]]},  # initialisation: 2 s of scoring, no bytes
        {"round": 1, "device_costs": [[1.0, MB, MB], [0.5, MB, MB]]},
        {"round": 2, "device_costs": [[1.0, MB, MB]]},
        {"round": 3, "device_costs": []},  # nobody to wait for
    ]
    # 10 Mbit/s: 1 s down + 1 s compute + 1 s up = 3 s per round (the 0.5 s device waits less).
    assert sim_time_at_bandwidth(history, 10.0) == pytest.approx([2.0, 5.0, 8.0, 8.0])
    # 100 Mbit/s: 0.1 + 1 + 0.1 = 1.2 s per round.
    assert sim_time_at_bandwidth(history, 100.0) == pytest.approx([2.0, 3.2, 4.4, 4.4])
    assert sim_time_at_bandwidth(history, float("inf")) == pytest.approx([2.0, 3.0, 4.0, 4.0])
    # A round-0 row without costs counts as no initialisation; a later one makes the run unsweepable.
    assert sim_time_at_bandwidth([{"round": 0}, *history[1:]], 10.0) == pytest.approx([0.0, 3.0, 6.0, 6.0])
    assert sim_time_at_bandwidth([history[0], {"round": 1}], 10.0) is None


def test_background_initialisation_delays_a_round_only_by_what_is_left():
    from fibecfed.compare import round_time_at_bandwidth, sim_time_at_bandwidth

    # A fourth number: initialisation seconds running in the background since the run started.
    assert round_time_at_bandwidth([[1.0, MB, MB, 5.0]], 10.0, elapsed_s=3.0) == pytest.approx(5.0)  # 3 s + 2 s left
    assert round_time_at_bandwidth([[1.0, MB, MB, 5.0]], 10.0, elapsed_s=6.0) == pytest.approx(3.0)  # already done
    history = [
        {"round": 0, "device_costs": []},
        {"round": 1, "device_costs": [[1.0, MB, MB, 4.0]]},  # 10 Mbit/s: 3 s + 4 s of init = 7 s
        {"round": 2, "device_costs": [[1.0, MB, MB, 4.0]]},  # 7 s elapsed: the init is done -> 3 s
    ]
    assert sim_time_at_bandwidth(history, 10.0) == pytest.approx([0.0, 7.0, 10.0])
    assert sim_time_at_bandwidth(history, 100.0) == pytest.approx([0.0, 5.2, 6.4])  # 1.2 + 4, then 1.2
    assert sim_time_at_bandwidth(history, float("inf")) == pytest.approx([0.0, 5.0, 6.0])


def test_costs_that_do_not_explain_the_simulated_time_are_flagged():
    runs = crossing_runs()
    assert summarise(runs, 0.5, "fedavg", {"fedavg": 10.0, "fibecfed": 10.0}, sweep_mbps=[10.0])["fibecfed"]["sweep_mismatch_s"] == pytest.approx(0.0)
    for row in runs["fibecfed"][0]:
        row["sim_time_s"] *= 2
    table = summarise(runs, 0.5, "fedavg", {"fedavg": 10.0, "fibecfed": 10.0}, sweep_mbps=[10.0])
    assert table["fibecfed"]["sweep_mismatch_s"] == pytest.approx(9.0)  # 18 s written, 9 s from the costs
    assert "Caution: for `fibecfed`" in markdown_table(table, 0.5, "fedavg")


def test_parse_bandwidths():
    from fibecfed.compare import parse_bandwidths

    assert parse_bandwidths("10, 1,1e3,10") == [1.0, 10.0, 1000.0]
    for bad in ("0", "-5", "fast", "inf", ""):
        with pytest.raises(ConfigError, match="--bandwidths"):
            parse_bandwidths(bad)


def test_cli_compare_flags():
    from fibecfed.cli import build_parser

    args = build_parser().parse_args(["compare", "--bandwidths", "1,10", "--personalized-target", "0.8"])
    assert args.bandwidths == "1,10" and args.personalized_target == 0.8


def test_score_rows_reads_the_chosen_metric_for_both_scores():
    from fibecfed.compare import score_rows

    row = {"round": 1, "accuracy": 0.9, "mcc": 0.4, "personalized_accuracy": 0.8, "personalized_mcc": 0.3}
    assert score_rows([row], "mcc")[0] | {} == {**row, "accuracy": 0.4, "personalized_accuracy": 0.3}
    # Old rows have no personalised MCC: the personalised score is then missing, not the accuracy.
    assert score_rows([{"round": 1, "mcc": 0.4, "personalized_accuracy": 0.8}], "mcc")[0]["personalized_accuracy"] is None


def new_rows(accs, personal, compute_step, init=0.0, sim_step=10.0, up_step=100):
    """Rows as the newer simulator writes them: personalised score on every evaluated round and a
    cumulative compute-only clock that starts with round 0's initialisation."""
    history = rows(accs, sim_step, up_step)
    for i, row in enumerate(history):
        row["personalized_accuracy"] = personal[i]
        row["sampled_personalized_accuracy"] = personal[i]
        row["compute_time_s"] = init + i * compute_step
    return history


def test_personalised_and_compute_only_figures_by_hand():
    runs = {
        # personalised smoothed: r1 .6, r2 .65, r3 .7 -> reaches 0.69 at round 3; compute 0 + 4 s/round -> 12 s
        "fedavg": [new_rows([0.3, 0.5, 0.6, 0.7, 0.7], [None, 0.6, 0.7, 0.8, 0.8], compute_step=4.0)],
        # personalised smoothed: r1 .7 -> round 1; compute 3 s init + 2 s/round -> 5 s at round 1
        "fast": [new_rows([0.3, 0.7, 0.7, 0.7, 0.7], [None, 0.7, 0.7, 0.7, 0.7], compute_step=2.0, init=3.0, sim_step=5.0, up_step=25)],
    }
    table = summarise(runs, 0.6, "fedavg", personalized_target=0.69)
    fedavg, fast = table["fedavg"], table["fast"]
    assert fedavg["personalized_best_smoothed_accuracy"] == pytest.approx(2.3 / 3)  # round 4: (.7 + .8 + .8) / 3
    assert fedavg["personalized_round_to_target"] == 3 and fast["personalized_round_to_target"] == 1
    assert fedavg["personalized_sim_time_to_target_s"] == 30.0 and fast["personalized_sim_time_to_target_s"] == 5.0
    assert fast["personalized_sim_time_to_target_s_ratio"] == pytest.approx(5.0 / 30.0)
    assert fast["personalized_upload_bytes_to_target_ratio"] == pytest.approx(25 / 300)
    assert fast["personalized_compute_time_to_target_s_ratio"] == pytest.approx(5.0 / 12.0)
    assert fast["personalized_compute_time_to_target_s_paired_ratios"] == [pytest.approx(5.0 / 12.0)]
    assert fast["personalized_final_accuracy_ratio"] == pytest.approx(0.7 / 0.8)
    assert fast["personalized_reached"] == 1
    # Global score (target 0.6): both at round 3, as in test_summarise_ratios_by_hand; compute 12 s vs 3 + 6 = 9 s.
    assert fast["compute_time_to_target_s"] == 9.0 and fedavg["compute_time_to_target_s"] == 12.0
    assert fast["compute_time_to_target_s_ratio"] == pytest.approx(0.75)
    assert fast["sim_time_to_target_s_ratio"] == pytest.approx(0.5)  # the global keys are unchanged
    assert fast["compute_time_s"] == pytest.approx(11.0)


def costs_rows(compute, round_bytes, init, rounds=3, accs=(0.3, 0.5, 0.7)):
    """One device per round, `compute` s and `round_bytes` each way; round 0 is the initialisation."""
    history = []
    for i in range(rounds):
        costs = ([[init, 0, 0]] if init else []) if i == 0 else [[compute, round_bytes, round_bytes]]
        history.append({"round": i, "accuracy": accs[i], "personalized_accuracy": accs[i], "devices": [0] if i else [],
                        "sim_time_s": init + i * (compute + 2 * round_bytes * 8 / 10e6),  # at 10 Mbit/s
                        "wall_time_s": float(i), "upload_bytes": i * round_bytes,
                        "download_bytes": i * round_bytes, "compute_time_s": init + i * compute, "device_costs": costs})
    return history


def crossing_runs():
    # Both reach 0.5 (smoothed: .3, .4, .5) at round 2.
    # fedavg: 1 s compute, 2 MB-units each way, no init: T(b) = 2 * (1 + 40/b) = 2 + 80/b seconds
    # fibecfed: 2 s compute, 0.5 MB-units each way, 3 s init: T(b) = 3 + 2 * (2 + 10/b) = 7 + 20/b
    # ratio (7 + 20/b) / (2 + 80/b) crosses 1 at b = 12 Mbit/s; compute only (b -> inf): 7 / 2 = 3.5.
    return {"fedavg": [costs_rows(1.0, 2 * MB, 0.0)], "fibecfed": [costs_rows(2.0, MB // 2, 3.0)]}


def test_bandwidth_sweep_ratio_crosses_one_where_expected():
    from fibecfed.compare import winning_speeds

    table = summarise(crossing_runs(), 0.5, "fedavg", personalized_target=0.5, sweep_mbps=[1.0, 10.0, 20.0, 100.0])
    for prefix in ("", "personalized_"):
        sweep = {p["mbps"]: p for p in table["fibecfed"][prefix + "bandwidth_sweep"]}
        assert sweep[1.0]["time_to_target_s"] == pytest.approx(27.0)  # 7 + 20
        assert sweep[1.0]["ratio"] == pytest.approx(27.0 / 82.0)  # fewer bytes win on a slow link
        assert sweep[10.0]["ratio"] == pytest.approx(9.0 / 10.0)
        assert sweep[20.0]["ratio"] == pytest.approx(8.0 / 6.0)  # more compute loses on a fast one
        assert sweep[100.0]["ratio"] == pytest.approx(7.2 / 2.8)
        assert sweep[100.0]["paired_ratios"] == [pytest.approx(7.2 / 2.8)]
        assert table["fibecfed"][prefix + "compute_time_to_target_s_ratio"] == pytest.approx(3.5)
        assert winning_speeds(table["fibecfed"][prefix + "bandwidth_sweep"]) == ([1.0, 10.0], [20.0, 100.0])
    assert table["fedavg"]["bandwidth_sweep"][0]["ratio"] == pytest.approx(1.0)
    md = markdown_table(table, 0.5, "fedavg", personalized_target=0.5, run_mbps=10.0)
    assert "| 10 | 10.0 | 9.0 (0.90) |" in md
    assert "| ∞ (compute only) | 2.0 | 7.0 (3.50) |" in md
    assert "`fibecfed` is faster at 1, 10, slower at 20, 100 Mbit/s" in md
    assert "unavailable" not in md


def test_old_rows_without_the_new_keys_do_not_crash(tmp_path):
    from fibecfed.compare import plot_bandwidth_sweep

    old = {"fedavg": [rows([0.3, 0.5, 0.6, 0.7, 0.7])], "m": [rows([0.3, 0.7, 0.7, 0.7, 0.7], sim_step=5.0)]}
    for r in old["m"][0]:
        r["personalized_accuracy"] = None  # a run that never scored personalised models
    table = summarise(old, 0.6, "fedavg", personalized_target=None, sweep_mbps=[1.0, 10.0])
    m = table["m"]
    assert m["device_costs_seeds"] == 0 and m["compute_time_to_target_s"] is None
    assert m["compute_time_to_target_s_ratio"] is None and m["compute_time_to_target_s_paired_ratios"] == []
    assert [p["time_to_target_s"] for p in m["bandwidth_sweep"]] == [None, None]
    assert m["personalized_final_accuracy"] is None and m["personalized_reached"] == 0
    assert m["sim_time_to_target_s_ratio"] == pytest.approx(0.5)  # the old figures still work
    md = markdown_table(table, 0.6, "fedavg", personalized_target=None)
    assert "Bandwidth sweep unavailable" in md and "no compute time" in md
    assert not plot_bandwidth_sweep(table, "fedavg", tmp_path / "bandwidth.png")
    assert not (tmp_path / "bandwidth.png").exists()


def test_compare_report_on_new_schema_runs(tmp_path):
    """compare() end to end with a stand-in for the simulator: default personalised target,
    the sweep in comparison.json and .md, and bandwidth.png."""
    from fibecfed import outputs
    from fibecfed.compare import compare

    fake = crossing_runs()

    def run_one(config, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        rows_ = fake["fibecfed" if config.method.name == "fibecfed" else "fedavg"][0]
        outputs.write_metrics(run_dir / "metrics.jsonl", [{**r, "sampled_personalized_accuracy": 0.1} for r in rows_])
        outputs.write_json(run_dir / "summary.json", {})
        return {}

    result = compare(parse_methods("fedavg,fibecfed"), [0], tmp_path, run_one=run_one, sweep_mbps=[100.0, 1.0])
    # fedavg's best smoothed score after round 0 is 0.5 (both scores): targets 0.95 x 0.5.
    assert result["target"] == pytest.approx(0.475) and result["personalized_target"] == pytest.approx(0.475)
    assert result["personalized_measure"] == "every device"
    assert result["sweep_bandwidths_mbps"] == [1.0, 100.0]
    saved = json.loads((tmp_path / "comparison.json").read_text())
    sweep = saved["methods"]["fibecfed"]["personalized_bandwidth_sweep"]
    assert [p["mbps"] for p in sweep] == [1.0, 100.0] and sweep[0]["ratio"] == pytest.approx(27.0 / 82.0)
    assert (tmp_path / "bandwidth.png").is_file()
    md = (tmp_path / "comparison.md").read_text()
    assert "Personalised accuracy" in md and "| ∞ (compute only) |" in md and "Caution" not in md
    # The same folder again as a report only, on rows that lost their costs: no stale plot is left.
    for path in tmp_path.glob("*/seed0/metrics.jsonl"):
        outputs.write_metrics(path, [{k: v for k, v in r.items() if k != "device_costs"} for r in outputs.read_metrics(path)])
    compare(parse_methods("fedavg,fibecfed"), [0], tmp_path, report_only=True)
    assert not (tmp_path / "bandwidth.png").exists()
    assert "Bandwidth sweep unavailable" in (tmp_path / "comparison.md").read_text()


def test_compare_runs_seed_by_seed_every_method_in_turn(tmp_path):
    """A slow spell on a shared machine then slows one seed's runs of every method alike."""
    from fibecfed import outputs
    from fibecfed.compare import compare

    fake, order = crossing_runs(), []

    def run_one(config, run_dir):
        order.append((config.method.name, config.seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs.write_metrics(run_dir / "metrics.jsonl", fake[config.method.name][0])
        outputs.write_json(run_dir / "summary.json", {})
        return {}

    result = compare(parse_methods("fedavg,fibecfed"), [0, 1], tmp_path, run_one=run_one)
    assert order == [("fedavg", 0), ("fibecfed", 0), ("fedavg", 1), ("fibecfed", 1)]
    assert result["methods"]["fibecfed"]["seeds"] == 2


def test_the_final_personalised_score_is_the_last_one_any_device_answered():
    # Seed 0's last round got no personalised answer (a Flower run whose nodes all failed it).
    seed0 = [{**r, "personalized_accuracy": p} for r, p in zip(rows([0.3, 0.6, 0.7]), [None, 0.5, None])]
    seed1 = [{**r, "personalized_accuracy": p} for r, p in zip(rows([0.3, 0.6, 0.7]), [None, 0.6, 0.9])]
    entry = summarise({"m": [seed0, seed1]}, 0.99, "m")["m"]
    assert entry["final_personalized_accuracy"] == pytest.approx((0.5 + 0.9) / 2)
    assert entry["personalized_final_accuracy"] == pytest.approx((0.5 + 0.9) / 2)


def test_compare_reuses_finished_runs_and_resumes_the_others(tmp_path):
    """A run whose summary and metrics reach the config's last round is read as it is; one that
    stopped short (or never wrote its summary) is handed to the runtime, which resumes it."""
    from fibecfed import outputs
    from fibecfed.compare import compare

    from fibecfed.config import config_to_dict

    rounds = 3
    calls = []

    def run_one(config, run_dir):
        calls.append((config.method.name, config.seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs.write_json(run_dir / "config.json", config_to_dict(config))
        outputs.write_metrics(run_dir / "metrics.jsonl", rows([0.3, 0.4, 0.5, 0.6]))
        outputs.write_json(run_dir / "summary.json", {"rounds": config.federation.rounds})
        return {}

    args = (parse_methods("fedavg,fibecfed"), [0, 1], tmp_path)
    compare(*args, run_one=run_one, overrides=[f"federation.rounds={rounds}"])
    assert len(calls) == 4
    calls.clear()
    # fedavg seed 1's summary covers 2 of the 3 rounds; fibecfed seed 0 has no summary.json.
    outputs.write_json(tmp_path / "fedavg" / "seed1" / "summary.json", {"rounds": 2})
    (tmp_path / "fibecfed" / "seed0" / "summary.json").unlink()
    compare(*args, run_one=run_one, overrides=[f"federation.rounds={rounds}"])
    assert calls == [("fibecfed", 0), ("fedavg", 1)]
    calls.clear()
    # Committed results carry no config.json (it is not committed): they are run again.
    (tmp_path / "fibecfed" / "seed1" / "config.json").unlink()
    compare(*args, run_one=run_one, overrides=[f"federation.rounds={rounds}"])
    assert calls == [("fibecfed", 1)]
