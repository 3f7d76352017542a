import subprocess
import sys

import pytest
import torch

from adapters import NoiseKey, noise_epoch, pair_factors


def test_same_key_same_numbers_in_another_process():
    key = NoiseKey(seed=7, epoch=3, pair=5, layer=11, module="gate_proj")
    a, b = pair_factors(key, 48, 32, 2)
    code = (
        "import sys, torch; from adapters import NoiseKey, pair_factors;"
        "a, b = pair_factors(NoiseKey(7, 3, 5, 11, 'gate_proj'), 48, 32, 2);"
        "sys.stdout.buffer.write(torch.cat([a, b]).numpy().tobytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert out == torch.cat([a, b]).numpy().tobytes()


def test_shapes_and_split():
    a, b = pair_factors(NoiseKey(0, 0, 0, 0, "q_proj"), 6, 4, 3)
    assert a.shape == (6, 3) and b.shape == (4, 3) and a.dtype == torch.float32


@pytest.mark.parametrize(
    "other",
    [
        NoiseKey(1, 0, 0, 0, "q_proj"),
        NoiseKey(0, 1, 0, 0, "q_proj"),
        NoiseKey(0, 0, 1, 0, "q_proj"),
        NoiseKey(0, 0, 0, 1, "q_proj"),
        NoiseKey(0, 0, 0, 0, "k_proj"),
        NoiseKey(0, 0, 1, 1, "q_proj"),
    ],
)
def test_different_keys_are_uncorrelated(other):
    base = torch.cat(pair_factors(NoiseKey(0, 0, 0, 0, "q_proj"), 4000, 4000, 1)).flatten()
    z = torch.cat(pair_factors(other, 4000, 4000, 1)).flatten()
    corr = torch.corrcoef(torch.stack([base, z]))[0, 1].item()
    # 8000 independent pairs: |corr| has std ~0.011; 0.05 is a 4.5-sigma bound.
    assert abs(corr) < 0.05
    assert not torch.equal(base, z)


def test_pair_and_layer_swap_are_not_the_same_stream():
    x = torch.cat(pair_factors(NoiseKey(0, 0, 1, 2, "q_proj"), 50, 50, 1))
    y = torch.cat(pair_factors(NoiseKey(0, 0, 2, 1, "q_proj"), 50, 50, 1))
    assert not torch.equal(x, y)


def test_noise_reuse_epochs():
    assert [noise_epoch(s, 4) for s in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert [noise_epoch(s, 1) for s in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="noise reuse must be >= 1"):
        noise_epoch(3, 0)


def test_statistics_are_standard_normal():
    a, b = pair_factors(NoiseKey(3, 0, 0, 0, "up_proj"), 100_000, 100_000, 1)
    z = torch.cat([a, b]).double()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1.0) < 0.01
