"""The ``piip-models`` command line: in-process through ``main(argv)``, and the installed script once."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from piip_models import cli
from piip_models.counting import count_model

ROW_KEYS = {
    "model", "convention", "input_size", "params", "macs", "latency_ms", "peak_mem_mb", "baseline", "macs_ratio",
    "time_ratio",
}


def test_list(capsys):
    assert cli.main(["list", "piip_tsb*"]) == 0
    out = capsys.readouterr().out
    assert "| piip_tsb | 368 | branches, in1k | 144M | 17.4 |" in out
    assert "piip_tsb_1120_896_448" in out and "piip_sbl" not in out
    assert cli.main(["list", "nothing_*"]) == 1


def test_info(capsys):
    assert cli.main(["info", "piip_tsb_1120_896_448"]) == 0
    out = capsys.readouterr().out
    assert "branch 0: deit3_base_patch16_224.fb_in22k_ft_in1k (VisionTransformer) @448px  dim 768" in out
    assert "branch 2: deit_tiny_patch16_224.fb_in1k (VisionTransformer) @1120px  dim 192" in out
    assert "175,043,715 (module as it runs, with its feature pyramid) / 146,441,707 (paper convention)" in out
    assert "243.13 (paper), published 243.0" in out
    assert "baseline: piip_baseline_vit_b_1024" in out


def test_bad_input_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["info", "piip_nope"]) == 2
    assert "no model matches 'piip_nope'" in capsys.readouterr().err
    assert cli.main(["flops", "--models", "piip_nope*", "--json", str(tmp_path / "rows.json")]) == 2
    assert not (tmp_path / "rows.json").exists()
    assert cli.main([]) == 2
    with pytest.raises(SystemExit):
        cli.main(["flops", "--convention", "fvcore"])


def test_flops_writes_json_and_csv(capsys, tmp_path):
    args = ["flops", "--models", "piip_tsb_1120_896_448", "--json", str(tmp_path / "r.json"),
            "--csv", str(tmp_path / "r.csv")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| piip_tsb_1120_896_448 | 1120 | 146.44 | 146 | 243.13 | 243.0 | §5.1, §9.5 |" in out  # published check
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["model"] for r in rows] == ["piip_baseline_vit_b_1024", "piip_tsb_1120_896_448"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    base, piip = rows
    assert piip["macs"] == count_model("piip_tsb_1120_896_448").macs and piip["convention"] == "paper"
    assert piip["baseline"] == base["model"] and piip["macs_ratio"] == pytest.approx(piip["macs"] / base["macs"])
    assert piip["latency_ms"] is None and piip["time_ratio"] is None
    with open(tmp_path / "r.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == [r["model"] for r in rows]


def test_bench_without_latency_in_full_convention(capsys):
    assert cli.main(["bench", "--no-latency", "--convention", "full", "--scale", "0.25",
                     "--models", "piip_tsb_1120_896_448"]) == 0
    out = capsys.readouterr().out
    full = count_model("piip_tsb_1120_896_448", "full", 288)
    assert f"| piip_tsb_1120_896_448 | full | 288 | {full.params / 1e6:.2f} | {full.macs / 1e9:.2f} |" in out
    assert "published" not in out  # the paper-convention check only accompanies paper counts


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_fails_before_any_work(capsys, tmp_path):
    json_path = tmp_path / "r.json"
    assert cli.main(["flops", "--models", "piip_tsb", "--plot", str(tmp_path / "p.png"), "--json", str(json_path)]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not json_path.exists()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert cli.main(["flops", "--models", "piip_tsb", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_subcommands_are_pluggable(monkeypatch, capsys):
    def add_hello_command(subparsers):
        parser = subparsers.add_parser("hello")
        parser.set_defaults(func=lambda args: print("hello") or 0)

    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, add_hello_command))
    assert cli.main(["hello"]) == 0
    assert capsys.readouterr().out == "hello\n"


def test_console_script_list():
    script = shutil.which("piip-models", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the piip-models console script is not installed beside this interpreter (pip install -e .)")
    proc = subprocess.run([script, "list", "piip_sbl*"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| piip_sbl_320_160_96 | 320 | branches, in1k | 489M | 39.0 |" in proc.stdout
