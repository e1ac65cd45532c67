"""docs/forking.md's worked example, run: a copy of the project with momentum added to the search, as the page
says, tunes it; the edits are the page's own lines, so the page and the test cannot drift apart."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "forking.md").read_text()


def example_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language} fork-example\n(.*?)```", PAGE, flags=re.S)


def insert_after(path: Path, anchor: str, line: str) -> None:
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path.name}: the anchor {anchor!r} moved; update docs/forking.md and this test"
    path.write_text(text.replace(anchor, anchor + line + "\n"))


def test_the_momentum_example_of_forking_md_tunes_momentum(synthetic_dir, tmp_path):
    fork = tmp_path / "fork"
    for folder in ("mlp", "scripts"):
        shutil.copytree(ROOT / folder, fork / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (python,) = example_blocks("python")
    field, flag = [line.split("#")[0].strip() for line in python.strip().splitlines()]
    search = fork / "mlp" / "search.py"
    insert_after(search, "    label_smoothing: tuple[float, float] | None = (0.0, 0.2)\n", f"    {field}")
    insert_after(search, '    "label_smoothing": "model.label_smoothing",\n', f"    {flag}")
    assert '"momentum": hp.momentum' in PAGE  # step 2, applied here:
    study = fork / "mlp" / "study.py"
    study.write_text(study.read_text().replace('"label_smoothing": hp.label_smoothing}',
                                               '"label_smoothing": hp.label_smoothing, "momentum": hp.momentum}'))

    (command,) = example_blocks("bash")
    args = command.replace("\\\n", " ").split()[2:]  # after `python scripts/tune.py`
    args += [f"--data.data_dir={synthetic_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
             "--data.val_size=100"]
    env = {**os.environ, "PYTHONPATH": str(fork)}
    result = subprocess.run([sys.executable, "scripts/tune.py", *args], cwd=fork, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "logs" / "tune" / "momentum" / "report.json").read_text())
    assert 0.5 <= report["best_params"]["momentum"] <= 0.95
    assert sum(report["trials"].get(state, 0) for state in ("complete", "pruned")) == 2
