"""infini-report: runs grouped over seeds, passkey intervals, both readings of pythia."""

from __future__ import annotations

import json
import statistics

import yaml


def write(path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def train_metrics(val_ppl: float, window: float | None) -> dict:
    return {"parameters": 100, "train_tokens": 2048, "passkey_sequences": 4, "epochs": 3,
            "seed": 0, "val_ppl_flag": "ok", "val_ppl_last_change": -0.01, "val_ppl": val_ppl,
            "val_ppl_window": window, "window_context_length": 32 if window else None,
            "window_stride": 8 if window else None}


def memory_metrics(acc: float, lo: float, hi: float) -> dict:
    return {"ppl_after_0": 50.0, "ppl_after_4": 49.0, "passkey_chance": 0.1,
            "passkey_trials": 100, "passkey_after_0": acc, "passkey_after_0_lo": lo,
            "passkey_after_0_hi": hi, "passkey_after_6": 0.1, "passkey_after_6_lo": 0.05,
            "passkey_after_6_hi": 0.17}


REVERSAL = {"injected_forward_rank_accuracy": 0.5, "injected_forward_answer_margin": 1.5,
            "control_backward_rank_accuracy": 0.25, "pairs": 8}


def test_the_report_groups_seeds_and_keeps_every_runs_own_figures(run_cli, tmp_path):
    runs = {"pythia": {"kind": "pythia"}, "pythia_seed-1": {"kind": "pythia", "seed": 1},
            "infini": {"kind": "infini"}, "infini_seed-1": {"kind": "infini", "seed": 1},
            "infini_delta-false": {"kind": "infini", "use_delta_rule": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"infini_runs": runs, "adapter_runs": {"parallel": {"mode": "parallel"}}}))
    ppl = {"pythia": (900.0, 700.0), "pythia_seed-1": (960.0, 720.0), "infini": (800.0, None),
           "infini_seed-1": (855.0, None), "infini_delta-false": (870.0, None)}
    for run, (val, window) in ppl.items():
        write(tmp_path / "im" / f"train_lm_{run}.json", train_metrics(val, window))
        write(tmp_path / "im" / f"eval_memory_{run}.json", memory_metrics(0.62, 0.52, 0.71))
        write(tmp_path / "im" / f"eval_reversal_{run}.json", REVERSAL)
    write(tmp_path / "im" / "eval_reversal.json", REVERSAL)
    write(tmp_path / "ppl.json", {"token_ppl": 20.0})
    write(tmp_path / "ad" / "parallel.json", {"mode": "parallel", "base_val_ppl": 25.0,
                                             "val_ppl": 24.0, "alpha": 1e-4,
                                             "train_tokens": 768})
    write(tmp_path / "ad" / "eval_reversal_parallel.json", REVERSAL)
    result = run_cli("infini-report", "--metrics-dir", "im", "--base-ppl", "ppl.json",
                     "--adapter-dir", "ad", "--reversal-adapter-runs", "[parallel]",
                     "--metrics", "report.json", cwd=tmp_path)
    assert result.code == 0, result.err
    out = json.loads((tmp_path / "report.json").read_text())
    # the spread over seeds on the configuration's first run, computed independently
    assert out["pythia__seeds"] == 2 and out["infini__seeds"] == 2
    assert out["pythia__val_ppl_seed_mean"] == statistics.mean([900.0, 960.0])
    assert abs(out["pythia__val_ppl_seed_sd"] - statistics.stdev([900.0, 960.0])) < 1e-9
    assert abs(out["pythia__val_ppl_window_seed_mean"] - 710.0) < 1e-9
    assert out["infini__val_ppl_seeds"] == "827.5 ± 38.9 (n=2)"
    assert "infini__val_ppl_window_seed_mean" not in out  # a memory kind has no window reading
    assert "infini_seed-1__seeds" not in out and "infini_delta-false__seeds" not in out
    # every run keeps its own figures, the ablation included
    assert out["infini_seed-1__val_ppl"] == 855.0
    assert out["infini_delta-false__passkey_d0"] == "0.62 [0.52, 0.71]"
    assert out["infini_delta-false__passkey_after_6_hi"] == 0.17
    assert out["pythia_seed-1__val_ppl_window"] == 720.0
    assert out["infini__injected_forward_answer_margin"] == 1.5
    assert out["base__control_backward_rank_accuracy"] == 0.25
    assert out["adapter-parallel__injected_forward_rank_accuracy"] == 0.5
    assert "infini__pairs" not in out
