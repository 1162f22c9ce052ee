"""Every bad input to ``upi-fast`` is one line on stderr naming the option, exit code 2, no
traceback (unless ``--debug``). Most cases call :func:`upi_fast.cli.main` in process; two run the
real command in subprocesses."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from upi_fast.cli import main
from upi_fast.io import save_perturbation

from hardening_support import make_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Datasets, weights and perturbation files, good and bad."""
    root = tmp_path_factory.mktemp("cli")
    f = {"root": root, "marker": root / "pwned"}
    f["data"] = make_image_folder(root / "imgs", per_class=4)
    f["five"] = make_image_folder(root / "five", classes=5, per_class=3)
    (root / "empty" / "c0").mkdir(parents=True)
    (root / "texts" / "c0").mkdir(parents=True)
    (root / "texts" / "c0" / "a.txt").write_text("not an image")
    (root / "file.txt").write_text("x")
    cifar = root / "cifar"
    cifar.mkdir()
    with open(cifar / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Payload(f["marker"])}, fh)
    f["cifar"] = str(cifar)
    payload = pickle.dumps(_Payload(f["marker"]))
    for name in ("evil.pkl", "evil.safetensors"):
        (root / name).write_bytes(payload)
    torch.save({"0.weight": torch.zeros(1), "x": _Payload(f["marker"])}, root / "evil.pt")
    torch.save({"conv.weight": torch.zeros(2)}, root / "wrong_keys.pt")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3, 8, 8)}, str(root / "plain.safetensors"))
    save_file({"delta": torch.ones(3, 8, 8, dtype=torch.int32)}, str(root / "int.safetensors"),
              metadata={"format": "upi_fast.perturbation/1"})
    save_perturbation(root / "good.safetensors", torch.full((3, 8, 8), 0.01), {"method": "test", "eps": 0.5})
    save_perturbation(root / "grey.safetensors", torch.zeros(1, 8, 8))
    raw = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[:len(raw) - 20])
    (root / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
    torch.save({"delta": torch.zeros(3, 8, 8)}, root / "torch.pt")
    return f


def _compute(f, *extra, drop=()):
    args = {"--data": f["data"], "--model": "hardening_support:make_model", "--size": "8", "--eps": "0.5",
            "--epochs": "1", "--batch-size": "4", "--attack-samples": "4", "--eval-samples": "4",
            "--out": str(f["root"] / "out")}
    argv = ["compute", "--no-progress"]
    for k, v in args.items():
        if k not in drop:
            argv += [k, v]
    return argv + list(extra)


def _evaluate(f, pert, *extra):
    return ["evaluate", str(f["root"] / pert), "--data", f["data"], "--model", "hardening_support:make_model",
            "--size", "8", "--eval-samples", "4", *extra]


def assert_one_line_error(capsys, argv, option):
    """``main(argv)`` returns 2 and prints exactly one non-empty stderr line naming ``option``."""
    capsys.readouterr()
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, (argv, rc, err)
    assert len(err) == 1, err
    assert err[0].startswith("upi-fast: error: ") and option in err[0], (option, err[0])
    assert "Traceback" not in err[0]
    return err[0]


CASES = {
    # numbers and choices
    "eps zero": (lambda f: _compute(f, "--eps", "0"), "--eps"),
    "eps nan": (lambda f: _compute(f, "--eps", "nan"), "--eps"),
    "eps inf": (lambda f: _compute(f, "--eps", "inf"), "--eps"),
    "eps negative": (lambda f: _compute(f, "--eps", "-1"), "--eps"),
    "eps text": (lambda f: _compute(f, "--eps", "big"), "--eps"),
    "eps-pixels nan": (lambda f: _compute(f, "--eps-pixels", "nan", drop=("--eps",)), "--eps-pixels"),
    "eps and eps-pixels": (lambda f: _compute(f, "--eps-pixels", "8"), "--eps"),
    "no eps": (lambda f: _compute(f, drop=("--eps",)), "--eps"),
    "norm 1": (lambda f: _compute(f, "--norm", "1"), "--norm"),
    "norm fro": (lambda f: _compute(f, "--norm", "fro"), "--norm"),
    "batch size 0": (lambda f: _compute(f, "--batch-size", "0"), "--batch-size"),
    "workers negative": (lambda f: _compute(f, "--workers", "-1"), "--workers"),
    "too many samples": (lambda f: _compute(f, "--attack-samples", "1000"), "--attack-samples"),
    "mean/std lengths": (lambda f: _compute(f, "--mean", "0.5,0.5", "--std", "0.2"), "--mean/--std"),
    "std zero": (lambda f: _compute(f, "--mean", "0.5", "--std", "0"), "--mean/--std"),
    "unknown hvp": (lambda f: _compute(f, "--hvp", "magic"), "--hvp"),
    "piecewise hvp on a smooth model": (lambda f: _compute(f, "--hvp", "piecewise_linear"), "--hvp"),
    "fp16 on the cpu": (lambda f: _compute(f, "--precision", "fp16"), "--precision"),
    "fast unknown": (lambda f: _compute(f, "--fast", "yes"), "--fast"),
    # data
    "data missing": (lambda f: _compute(f, "--data", str(f["root"] / "nope")), "--data"),
    "data empty": (lambda f: _compute(f, "--data", str(f["root"] / "empty")), "--data"),
    "data without images": (lambda f: _compute(f, "--data", str(f["root"] / "texts")), "--data"),
    "data is a file": (lambda f: _compute(f, "--data", str(f["root"] / "file.txt")), "--data"),
    "labels out of range": (lambda f: _compute(f, "--data", f["five"], "--attack-samples", "12", "--eval-samples",
                                               "3", "--batch-size", "12"), "--data"),
    "malicious cifar pickle": (lambda f: _compute(f, "--data", f["cifar"]), "--data"),
    # models and weights
    "channels do not fit": (lambda f: _compute(f, "--model", "hardening_support:grey_model"), "--model"),
    "size does not fit": (lambda f: _compute(f, "--size", "12"), "--size"),
    "not differentiable": (lambda f: _compute(f, "--model", "hardening_support:nograd_model"), "--model"),
    "output ignores the input": (lambda f: _compute(f, "--model", "hardening_support:const_model"), "--model"),
    "not a module": (lambda f: _compute(f, "--model", "hardening_support:not_a_module"), "--model"),
    "module missing": (lambda f: _compute(f, "--model", "no_such_module_xyz:make"), "--model"),
    "bad spec": (lambda f: _compute(f, "--model", "resnet18"), "--model"),
    "unknown torchvision model": (lambda f: _compute(f, "--model", "torchvision:resnet1"), "--model"),
    "weights missing": (lambda f: _compute(f, "--weights", str(f["root"] / "nope.pt")), "--weights"),
    "weights malicious zip": (lambda f: _compute(f, "--weights", str(f["root"] / "evil.pt")), "--weights"),
    "weights malicious pickle": (lambda f: _compute(f, "--weights", str(f["root"] / "evil.pkl")), "--weights"),
    "weights pickle named safetensors": (lambda f: _compute(f, "--weights", str(f["root"] / "evil.safetensors")),
                                         "--weights"),
    "weights wrong keys": (lambda f: _compute(f, "--weights", str(f["root"] / "wrong_keys.pt")), "--weights"),
    # environment
    "unknown backend": (lambda f: ["--backend", "fast", *_compute(f)], "--backend"),
    "device tpu": (lambda f: _compute(f, "--device", "tpu"), "--device"),
    "out is a file": (lambda f: _compute(f, "--out", str(f["root"] / "file.txt")), "--out"),
    # perturbation files
    "perturbation missing": (lambda f: _evaluate(f, "nope.safetensors"), "perturbation"),
    "perturbation wrong shape": (lambda f: _evaluate(f, "grey.safetensors"), "perturbation"),
    "perturbation int dtype": (lambda f: _evaluate(f, "int.safetensors"), "perturbation"),
    "perturbation truncated": (lambda f: _evaluate(f, "truncated.safetensors"), "perturbation"),
    "perturbation random bytes": (lambda f: _evaluate(f, "random.safetensors"), "perturbation"),
    "perturbation plain safetensors": (lambda f: _evaluate(f, "plain.safetensors"), "perturbation"),
    "perturbation torch file": (lambda f: _evaluate(f, "torch.pt"), "perturbation"),
    "perturbation malicious pickle": (lambda f: _evaluate(f, "evil.pkl"), "perturbation"),
    "evaluate k too large": (lambda f: _evaluate(f, "good.safetensors", "--k", "1000"), "--k"),
    "show truncated": (lambda f: ["show", str(f["root"] / "truncated.safetensors"), "--out", str(f["root"] / "s")],
                       "perturbation"),
    "show malicious pickle": (lambda f: ["show", str(f["root"] / "evil.pkl"), "--out", str(f["root"] / "s")],
                              "perturbation"),
    "show data without model": (lambda f: ["show", str(f["root"] / "good.safetensors"), "--data", f["data"],
                                           "--out", str(f["root"] / "s")], "--model"),
    "show wrong shape": (lambda f: ["show", str(f["root"] / "grey.safetensors"), "--data", f["data"], "--size", "8",
                                    "--model", "hardening_support:make_model", "--out", str(f["root"] / "s")],
                         "perturbation"),
    # the command line itself
    "no subcommand": (lambda f: [], "subcommand"),
    "unknown subcommand": (lambda f: ["frobnicate"], "frobnicate"),
    "missing required": (lambda f: ["compute"], "--data"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_option(files, capsys, case):
    make, option = CASES[case]
    assert_one_line_error(capsys, make(files), option)
    assert not files["marker"].exists()  # no payload ever ran


@NO_CUDA
def test_cuda_requests_without_cuda(files, capsys):
    assert_one_line_error(capsys, _compute(files, "--device", "cuda"), "--device")
    assert_one_line_error(capsys, _evaluate(files, "good.safetensors", "--device", "cuda:0"), "--device")
    assert_one_line_error(capsys, ["--backend", "cuda", *_compute(files)], "--backend")


def test_existing_checkpoints_need_resume(files, capsys):
    ck = str(files["root"] / "ck")
    assert main(_compute(files, "--checkpoint-every", "1", "--checkpoint-dir", ck)) == 0
    assert_one_line_error(capsys, _compute(files, "--checkpoint-every", "1", "--checkpoint-dir", ck),
                          "--checkpoint-dir")
    assert_one_line_error(capsys, _compute(files, "--checkpoint-dir", ck, "--resume", "--eps", "0.25"), "--resume")


def test_train_mode_model_runs_in_eval_mode(files, capsys):
    """A model factory that returns a train-mode model (BatchNorm, Dropout): loaded in eval mode."""
    capsys.readouterr()
    assert main(_compute(files, "--model", "hardening_support:train_mode_model", "--out",
                         str(files["root"] / "train"))) == 0
    assert "error" not in capsys.readouterr().err


def test_real_command_one_line_without_debug_traceback_with(files):
    """The installed entry point in fresh processes: a bad input deep in the computation (labels
    outside the model's range) is one line and exit code 2; ``--debug`` shows the traceback."""
    env = {**os.environ, "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    argv = _compute(files, "--data", files["five"], "--attack-samples", "12", "--eval-samples", "3",
                    "--batch-size", "12")
    procs = [subprocess.Popen([sys.executable, "-m", "upi_fast.cli", *pre, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for pre in ([], ["--debug"])]
    (_, err), (_, err_debug) = (p.communicate(timeout=120) for p in procs)
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[0].returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("upi-fast: error: --data: ") and "labels outside [0, 2]" in lines[0]
    assert "Traceback" not in err
    assert procs[1].returncode == 1 and "Traceback (most recent call last)" in err_debug
    assert "ValueError" in err_debug and "labels outside [0, 2]" in err_debug


# ------------------------------------------------------------------------------------------ interrupted runs
def test_interrupted_compute_never_leaves_a_half_written_file(files, tmp_path):
    """``upi-fast compute`` processes SIGKILLed at two points (while solving and checkpointing every
    step, and once the perturbation is written): every file left behind either loads as valid and
    complete (the perturbation equals the uninterrupted run's, bit for bit; checkpoints verify) or is
    rejected; truncated copies of a valid perturbation are rejected."""
    import signal
    import time

    from upi_fast.checkpoint import _NAME as checkpoint_name
    from upi_fast.checkpoint import load_checkpoint
    from upi_fast.io import load_perturbation

    env = {**os.environ, "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}

    def start(out: str, *extra: str) -> subprocess.Popen:
        argv = _compute(files, "--epochs", "6", "--batch-size", "2", "--attack-samples", "8", "--eval-samples", "4",
                        "--seed", "3", "--out", out, *extra)
        return subprocess.Popen([sys.executable, "-u", "-m", "upi_fast.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    ref = start(str(tmp_path / "ref"))
    victims = {name: start(str(tmp_path / name), "--checkpoint-every", "1")
               for name in ("while_solving", "after_writing")}
    for name, proc in victims.items():
        if name == "while_solving":  # killed once its second checkpoint is on disk (of 24 steps)
            ckdir, t0 = tmp_path / name / "checkpoints", time.time()
            while not (ckdir.is_dir() and any(int(f.name[5:14]) >= 2 for f in ckdir.glob("ckpt-*.safetensors"))):
                assert time.time() - t0 < 120 and proc.poll() is None
                time.sleep(0.005)
        else:
            for line in proc.stdout:  # the data summary, then (at the end) the table and "wrote ..."
                if line.startswith("method"):
                    break
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        assert proc.returncode in (-signal.SIGKILL, 0), proc.returncode
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    want, _ = load_perturbation(tmp_path / "ref" / "upi.safetensors")
    assert victims["while_solving"].returncode == -signal.SIGKILL
    assert not (tmp_path / "while_solving" / "upi.safetensors").exists()
    assert (tmp_path / "after_writing" / "upi.safetensors").exists()
    for name in victims:
        for dirpath, _, names in os.walk(tmp_path / name):
            for fname in names:
                path = os.path.join(dirpath, fname)
                if fname == "upi.safetensors":  # complete, or it would not be there
                    delta, meta = load_perturbation(path)
                    assert torch.equal(delta, want) and meta["seed"] == 3
                elif fname.startswith("ckpt-"):
                    load_checkpoint(path)  # verifies its checksum
                elif fname.endswith(".tmp"):  # left by a writer killed before its rename: never read
                    with pytest.raises(ValueError):
                        load_perturbation(path)
                    # a kill between a temporary checkpoint's last byte and its rename can leave it
                    # complete; what matters is that resuming never picks a temporary file up
                    assert not checkpoint_name.match(fname)
    raw = (tmp_path / "ref" / "upi.safetensors").read_bytes()
    for cut in (0, 7, 8, 64, len(raw) // 2, len(raw) - 4, len(raw) - 1):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="not a valid perturbation file"):
            load_perturbation(tmp_path / "cut.safetensors")


def test_compute_fast_writes_the_same_kind_of_result(files, capsys):
    """``--fast on`` runs UPI-Grad through the prepared step and records it in the file's metadata."""
    from upi_fast.io import load_perturbation
    for method, name in (("grad", "UPI-Grad"), ("pca", "UPI-PCA")):
        assert main(_compute(files, "--fast", "on", "--method", method)) == 0
        delta, meta = load_perturbation(str(files["root"] / "out" / "upi.safetensors"))
        assert meta["fast"] == "on" and meta["method"] == name
        assert torch.isfinite(delta).all() and 0 < float(delta.norm()) <= 0.5 * (1 + 1e-5)
