"""Training in fresh processes (JAX not started yet): one process trains data-parallel on two CPU devices,
printing progress lines off a terminal; two processes on 127.0.0.1 (`--distributed`, one CPU device each) with
the same global batch and seed, stopped and resumed as a pair, end with the same parameters."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import TINY

from molgen.models import load_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args, env):
    return subprocess.Popen([sys.executable, "-m", "molgen", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout=400):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(load_model(a).params), jax.tree_util.tree_leaves(load_model(b).params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_two_devices_or_two_processes_train_and_resume_alike(tmp_path, data_dir):
    from conftest import FAST_COMPILE

    base = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
    common = [*TINY, "--batch-size", 8, "--seed", 3, "--data-dir", data_dir,
              "--set", "optim.ckpt_every=2", "--set", "optim.eval_every=2"]
    one, pair = tmp_path / "one", tmp_path / "pair"

    def both(extra, out):
        port = _free_port()
        envs = [dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
                for i in (0, 1)]
        return _finish([_train([*common, *extra, "--devices", 1, "--distributed", "--out", out], e) for e in envs])

    # one process on two devices, straight to step 6; the pair to step 4, then resumed to 6: the same parameters
    out, err = _finish([_train([*common, "--steps", 6, "--devices", 2, "--out", one], base)])[0]
    assert "devices 2 (cpu)" in err and "step 6" in out
    assert "step 6/6  loss" in err and "left" in err  # a progress line for the log
    outs = both(["--steps", 4], pair)
    assert "devices 2 (cpu)" in outs[0][1] and "step 4" in outs[0][0]
    assert (pair / "metrics.jsonl").read_text().count('"step": 4,') == 1  # one process writes the log
    outs = both(["--steps", 6, "--resume"], pair)
    assert "resumed from step 4" in outs[0][1] and "step 6" in outs[0][0]
    assert [json.loads(line)["step"] for line in (pair / "metrics.jsonl").read_text().splitlines()][-1] == 6
    assert load_model(pair).meta["step"] == 6
    _same_params(one, pair)


def test_distributed_without_a_cluster_is_one_line(tmp_path, data_dir):
    """--distributed with no coordinator to find (no JAX_COORDINATOR_ADDRESS, no cluster manager), or a process
    count that is not a number: one error line, exit code 2, nothing written."""
    from conftest import FAST_COMPILE

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM", "JAX_PROCESS", "SLURM"))}
    env.update(XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
    args = [*TINY, "--steps", 2, "--data-dir", data_dir, "--distributed", "--out", tmp_path / "r"]
    for extra, message in (({}, "(set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under"),
                           ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be a whole number, got 'two'")):
        p = _train(args, dict(env, **extra))
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "Traceback" not in err, err
        line = err.strip().splitlines()[-1]  # JAX's own words differ between releases
        assert line.startswith("error: --distributed: ") and message in line, err
        assert not (tmp_path / "r").exists()


def test_a_jax_release_whose_cpu_collectives_hang_is_refused():
    """JAX 0.12.1's processes hang in the first all-reduce of a chunk on CPUs: --distributed there is one error
    that names the release and what to install; GPUs and other releases go on."""
    from molgen import MolgenError
    from molgen.jax_setup import refuse_hanging_collectives

    with pytest.raises(MolgenError, match=r"JAX 0\.12\.1 .*pip install 'jax!=0\.12\.1' 'jaxlib!=0\.12\.1'"):
        refuse_hanging_collectives("0.12.1", "cpu")
    for version, platform in (("0.12.1", "gpu"), ("0.12.0.1", "cpu"), ("0.10.2", "cpu")):
        refuse_hanging_collectives(version, platform)
