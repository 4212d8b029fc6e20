"""benchmarks/sampler_ab.py: `overlap-sampler ablate` with the script's defaults (tests/test_ablate.py tests
the ablation itself)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler_ab.py"


def test_the_script_is_ablate_with_its_defaults(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("sampler_ab", SCRIPT)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    calls = []
    monkeypatch.setattr(ab, "cli_main", lambda argv: calls.append(argv) or 0)
    assert ab.main(["--seeds", "0", "--name", "mine", "--out", str(tmp_path)]) == 0
    argv = calls[0]
    assert argv[0] == "ablate" and argv[-2:] == ["--name", "ab-mine"]
    assert argv[argv.index("--runs-dir") + 1] == "output/ab" and argv[argv.index("--jobs") + 1] == "2"
    assert argv[-4:-2] == ["--out", str(tmp_path)]  # given flags come after the defaults: they win
    assert ab.main([]) == 0 and calls[1][-1] == "ab-synthetic"
