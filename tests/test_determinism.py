"""The same seed gives a bit-identical perturbation on the CPU, for UPI-Grad and UPI-PCA (and
PCA+), across two runs in fresh processes (run side by side), and equal to this process's run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Every run: seeded model and data, smoothing noise, shuffled batches (tensors and a shuffling
# DataLoader), Adam, several PCA solvers and rounds. Writes {name: delta} to argv[1].
_SCRIPT = r'''
import sys
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from upi_fast.solvers import UPIGrad, UPIPCA
from hardening_support import make_model


def run():
    m = make_model(channels=1, size=6)
    X = torch.rand(24, 1, 6, 6, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y = m(X).argmax(1)
    y[::5] = (y[::5] + 1) % 3  # some samples misclassified: filtered out
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    kw = dict(progress=False, seed=7)
    return {
        "grad": UPIGrad(m, 0.5, epochs=2, batch_size=8, **kw).fit((X, y)).delta_,
        "grad_adam_loader": UPIGrad(m, 0.5, epochs=2, optimizer="adam", **kw).fit(loader).delta_,
        "grad_linf_smoothgrad": UPIGrad(m, 0.05, norm="inf", epochs=1, batch_size=8, saliency="smoothgrad",
                                        saliency_kwargs={"smoothgrad_std": 0.1, "n_samples": 2},
                                        **kw).fit((X, y)).delta_,
        "pca_exact": UPIPCA(m, 0.5, batch_size=8, **kw).fit((X, y)).delta_,
        "pca_sketch_rounds": UPIPCA(m, 0.5, solver="sketch", rounds=2, batch_size=8, **kw).fit(loader).delta_,
        "pca_plus": UPIPCA(m, 0.5, plus_lambda=1.0, batch_size=8, **kw).fit((X, y)).delta_,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    save_file({k: v.contiguous() for k, v in run().items()}, sys.argv[1])
'''


def test_same_seed_same_bits_in_fresh_processes(tmp_path):
    script = tmp_path / "run_solvers.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"run{i}.safetensors" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(o)], stderr=subprocess.PIPE, text=True, env=env)
             for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    a, b = (load_file(str(o)) for o in outs)
    assert set(a) == set(b) == {"grad", "grad_adam_loader", "grad_linf_smoothgrad", "pca_exact", "pca_sketch_rounds",
                                "pca_plus"}
    for name in a:
        assert a[name].dtype == torch.float32 and a[name].shape == (1, 6, 6)
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), name  # bit for bit
        assert float(a[name].abs().max()) > 0, name
    # and this process (one thread too) gets the same bits
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_solvers", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    here = mod.run()
    for name in a:
        assert torch.equal(here[name], a[name]), name
