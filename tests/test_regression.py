"""Every shipped model samples the same molecules as when its weights were committed: coordinates within 3e-3 Å
and identical atom types, per model and sampler (tests/data/regression_samples.npz, made by `molgen sample` with the
seed, sampler and card settings recorded in it; a case that records no type bias is drawn without one, as it was
recorded before the default's card had one). The samples are drawn in a subprocess with the tests'
faster, less optimising XLA flags (half the compile time), which round differently from `molgen sample`'s.

Measured against the recording (2026-12-02, an AMD EPYC): with these flags at most 1.1e-3 Å (20 ancestral steps
of edm-small-diffusion; every other case 3e-4 Å or less), with XLA also limited to AVX 3.5e-4 Å; with `molgen
sample`'s flags limited to AVX 7.1e-4 Å (2026-12-01). The ancestral cases were drawn again on 2026-12-04 (the
respaced steps moved to (i / k)^1.5): 3.1e-4 Å (edm-small-diffusion, 20 steps) and 3.7e-4 Å (edm-diffusion, 3)
with these flags; edm-diffusion's case again with the weights of its run 3 (2026-12-04): 1.9e-4 Å. The default's
case, `edm-small-polished` at one call, was recorded on 2026-12-05, and again with each of its later weights
(2026-12-06, four times on 2026-12-07). So every case is a well-conditioned one (molecules of a few Å); a 3-step ODE sample, spread over 100 Å,
moved by 1.5 Å between two CPUs and is no longer a case."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

DATA = np.load(Path(__file__).parent / "data" / "regression_samples.npz")
SPEC = json.loads(str(DATA["spec"]))

# The cases name the samplers as they were named when recorded: "refine" is today's anneal sampler, and a
# consistency model's "ancestral" its multistep sampler (the default); "refine" calls are today's --polish.
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from molgen.models import load_model, polisher_for
    from molgen.sample import sample
    out = {}
    for case in json.loads(sys.argv[1]):
        m = load_model(case["model"])
        sampler = {"ancestral": None, "refine": "anneal"}.get(case["sampler"], case["sampler"])
        pol = polisher_for(m) if case["refine"] else None
        mols = sample(m, case["n"], case["steps"], 0, sampler=sampler, temperature=case["temperature"],
                      renoise=case["renoise"], polish_calls=case["refine"], polisher=pol,
                      type_bias=case.get("type_bias", {})).molecules
        k = case["key"]
        out[k + "_pos"] = np.concatenate([m.positions for m in mols])
        out[k + "_types"] = np.concatenate([m.types for m in mols])
        out[k + "_sizes"] = np.array([len(m.types) for m in mols])
    np.savez(sys.argv[2], **out)
""")


def test_shipped_models_sample_as_recorded(tmp_path):
    """All cases in one test, so that one worker of a parallel run draws them (a module fixture would be drawn
    again by every worker that runs one of its tests)."""
    path = tmp_path / "drawn.npz"
    from conftest import FAST_COMPILE

    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(SPEC), str(path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    drawn = np.load(path)
    for case in SPEC:
        key = case["key"]
        np.testing.assert_array_equal(drawn[key + "_sizes"], DATA[key + "_sizes"], err_msg=key)
        np.testing.assert_array_equal(drawn[key + "_types"], DATA[key + "_types"], err_msg=key)
        np.testing.assert_allclose(drawn[key + "_pos"], DATA[key + "_pos"], atol=3e-3, rtol=0, err_msg=key)
