"""Every example in ``examples/`` runs end to end in ``--smoke`` mode (a few steps), prints
its result table without NaNs and writes its pictures."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_"))

#: The extra packages (``pip install -e ".[examples]"``) and the PNGs of each example.
NEEDS = {
    "discrete_vae": (["matplotlib"], ["elbo.png", "reconstructions.png", "samples.png"]),
    "distributed_vae": (["sklearn"], []),
    "generative_story": (["matplotlib"], ["gradients.png"]),
    "hard_attention": (["matplotlib"], ["accuracy.png"]),
    "lightning_vae": (["sklearn", "lightning"], []),
    "rl_cartpole": (["matplotlib", "gymnasium"], ["returns.png"]),
    "sequence_reward": (["matplotlib", "sacrebleu"], ["bleu.png"]),
    "vi_continuous": (["matplotlib"], ["elbo.png"]),
}


def test_every_example_is_listed():
    assert sorted(NEEDS) == EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_smoke(example, tmp_path):
    packages, pictures = NEEDS[example]
    for package in packages:
        pytest.importorskip(package)
    out = ["--out", str(tmp_path)] if pictures else []
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", f"examples/{example}.py", "--smoke", *out],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stderr}"
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) >= 2, result.stdout  # a header and at least one result
    assert not any("nan" in row.split("|", 2)[-1] for row in rows), result.stdout
    for picture in pictures:
        assert (tmp_path / picture).stat().st_size > 1000, picture
