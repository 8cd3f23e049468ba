"""scripts/gpu_ingest.py, the step that lands a teacher's GPU run: its guards and the card's text, on hand-built
runs and archives (no GPU, no network)."""

import io
import tarfile
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
ingest = load_script("scripts/gpu_ingest.py")


def run(epochs, atom=None, mol=None):
    r = {"epochs": epochs}
    if atom is not None:
        r["eval_1000_calls"] = {"atom_stability": atom, "mol_stability": mol, "validity": 0.5, "novelty": 0.9}
    return r


def test_a_run_thrown_back_is_refused(capsys):
    runs = [run(22.0, 0.7959, 0.023), run(90.0)]
    with pytest.raises(SystemExit) as e:
        ingest.check_not_worse(runs, {"atom_stability": 0.7700}, max_drop=0.02)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "79.59 %" in err and "77.00 %" in err and "--accept-worse" in err


def test_a_small_drop_or_a_gain_lands():
    runs = [run(22.0, 0.7959, 0.023), run(90.0)]
    lands = ingest.check_not_worse(runs, {"atom_stability": 0.7800}, max_drop=0.02)  # 1.6 points: within the noise
    assert lands["atom_stability"] == 0.7959  # compared with the last evaluated run
    assert ingest.check_not_worse(runs, {"atom_stability": 0.9000}, max_drop=0.02)["atom_stability"] == 0.7959
    assert ingest.check_not_worse([run(22.0)], {"atom_stability": 0.1}, max_drop=0.02) is None  # nothing to compare


def test_the_guard_compares_with_the_last_evaluated_run():
    runs = [run(22.0, 0.70, 0.01), run(40.0, 0.85, 0.10), run(30.0), run(30.0)]  # run 3 landed without samples
    with pytest.raises(SystemExit):
        ingest.check_not_worse(runs, {"atom_stability": 0.80}, max_drop=0.02)
    assert ingest.check_not_worse(runs, {"atom_stability": 0.84}, max_drop=0.02)["atom_stability"] == 0.85


def test_headline_counts_all_epochs_and_names_the_last_point():
    assert ingest.headline([run(22.0)]) == "teacher in training (256 x 9), 22.0 epochs: not sampled yet"
    h = ingest.headline([run(22.0, 0.7959, 0.023), run(70.5, 0.9012, 0.254)])
    assert h == "teacher in training (256 x 9), 92.5 epochs: 90.1 % atom / 25.4 % molecule stability at 1000 calls"
    h = ingest.headline([run(22.0, 0.7959, 0.023), run(70.5)])
    assert h.endswith("79.6 % atom / 2.3 % molecule stability at 1000 calls after 22.0 epochs")


def tar_parts(tmp_path, files: dict[str, bytes], part_size: int) -> list[Path]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    parts = []
    for i in range(0, len(raw), part_size):
        parts.append(tmp_path / f"weights.tar.{i // part_size:02d}")
        parts[-1].write_bytes(raw[i : i + part_size])
    return parts


def test_unpack_joins_the_parts(tmp_path):
    """As `gpu_teacher.sh` packs what `molgen export` wrote: the three model files and recipe.toml, of which only
    the model files are taken (the teacher's folder keeps its own recipe)."""
    files = {f"w_teacher/{n}": n.encode() * 100 for n in ingest.KEEP + ("recipe.toml",)}
    parts = tar_parts(tmp_path, files, part_size=2048)
    assert len(parts) > 1
    (tmp_path / "x").mkdir()
    folder = ingest.unpack(parts, tmp_path / "x")
    assert folder == tmp_path / "x" / "w_teacher"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ingest.KEEP)
    assert (folder / "config.json").read_bytes() == b"config.json" * 100


def test_unpack_refuses_a_missing_part_or_other_files(tmp_path, capsys):
    files = {f"w_teacher/{n}": n.encode() * 500 for n in ingest.KEEP}  # ~18 KiB of data, tar pads to 20 KiB
    parts = tar_parts(tmp_path, files, part_size=2048)
    (tmp_path / "x").mkdir()
    with pytest.raises(SystemExit) as e:  # the last parts lost: the archive ends inside the last file
        ingest.unpack(parts[:-3], tmp_path / "x")
    assert e.value.code == 2 and "cut short" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a part lost in the middle
        ingest.unpack(parts[:2] + parts[3:], tmp_path / "x")
    assert e.value.code == 2 and "00, 01, 03" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    parts = tar_parts(other, {**files, "w_teacher/evil.sh": b"x"}, part_size=1 << 20)
    (tmp_path / "y").mkdir()
    with pytest.raises(SystemExit) as e:
        ingest.unpack(parts, tmp_path / "y")
    assert e.value.code == 2 and "evil.sh" in capsys.readouterr().err
    assert not (tmp_path / "y" / "w_teacher").exists()


def test_the_benchmark_log_never_overwrites_an_earlier_one(tmp_path):
    first = ingest.bench_target(tmp_path, "2026-12-04", "NVIDIA H200", 2)
    assert first.name == "2026-12-04_h200_gpu_run2.log"
    first.write_text("a run that was not kept\n")
    (tmp_path / "2026-12-04_h200_gpu_run3.log").write_text("another\n")
    assert ingest.bench_target(tmp_path, "2026-12-04", "NVIDIA H200", 2).name == "2026-12-04_h200_gpu_run4.log"
    assert first.read_text() == "a run that was not kept\n"
