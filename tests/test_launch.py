"""``--shard auto``: shard and device from SLURM and torchrun environments, and real processes under them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from f2d_bench.cli import main
from f2d_bench.config import config_from_dict
from f2d_bench.engine import generate_run
from f2d_bench.errors import ConfigError
from f2d_bench.grid import Shard
from f2d_bench.launch.environment import (LAUNCH_VARIABLES, detect_launch, node_gpu_count, pin_device,
                                          pinned_devices)
from f2d_bench.run_dir import RunDir

from conftest import REPO, TWO_PROCESS_LAUNCHERS, face_dir, run_hashes, small_config_dict


@pytest.mark.parametrize("env, shard, local, launcher", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, (1, 2), 0, "torchrun"),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (6, 8), 1, "torchrun"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2"}, (3, 4), 2, "SLURM tasks"),
    # sbatch --array=0-3 (SLURM sets MIN, MAX, STEP and COUNT)
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3",
      "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, (4, 4), None, "SLURM array"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
      "SLURM_ARRAY_TASK_STEP": "2"}, (3, 5), None, "SLURM array"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, (1, 2), None, "SLURM array"),
    # the batch step of an array task: one task, nothing more to split
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (2, 2), None, "SLURM array"),
    # an array of 3 tasks, each running torchrun with 4 ranks: 12 shards
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "2",
      "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     (10, 12), 1, "SLURM array x torchrun"),
])
def test_detect_launch_reads_each_launcher(env, shard, local, launcher):
    found = detect_launch(env)
    assert (found.shard.index, found.shard.count) == shard
    assert found.local_rank == local and found.launcher == launcher
    assert set(found.variables) <= set(env) and launcher in found.describe()
    assert f"shard {shard[0]}/{shard[1]}" in found.describe()


def test_every_slot_of_a_launch_is_one_shard_exactly_once():
    seen = [detect_launch({"SLURM_ARRAY_TASK_ID": str(a), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "2",
                           "RANK": str(r), "WORLD_SIZE": "4"}).shard for a in range(3) for r in range(4)]
    assert sorted(s.index for s in seen) == list(range(1, 13)) and {s.count for s in seen} == {12}


def test_no_launcher_is_an_error_naming_the_variables():
    with pytest.raises(ConfigError) as err:
        detect_launch({"HOME": "/root"})
    for name in ("SLURM_ARRAY_TASK_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                 "--shard i/N"):
        assert name in str(err.value)
    assert {"SLURM_ARRAY_TASK_ID", "SLURM_LOCALID", "LOCAL_RANK"} <= set(LAUNCH_VARIABLES)


@pytest.mark.parametrize("env, match", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not in 0\.\.1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "neither SLURM_ARRAY_TASK_MIN/MAX"),
    # --array=1,3,7: the ids do not map onto 1..N
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_COUNT": "3"}, r"do not map onto shards 1\.\.N.*--shard \$\(\(SLURM_ARRAY_TASK_ID \+ 1\)\)/N"),
])
def test_inconsistent_launch_variables_are_refused(env, match):
    with pytest.raises(ConfigError, match=match):
        detect_launch(env)


@pytest.mark.parametrize("local, visible, pinned", [
    (3, None, "3"),  # torchrun on a node: every rank sees every GPU
    (1, "4,5,6,7", "5"),  # a launcher that gave the job four GPUs
    (5, "4,5", "5"),  # more ranks than GPUs: they share, modulo
    (2, "6", None),  # srun --gpus-per-task=1: already the task's own GPU
    (0, "", None),  # no GPU at all
])
def test_local_rank_pins_its_gpu(local, visible, pinned):
    assert pinned_devices(local, visible) == pinned


def test_ranks_beyond_the_nodes_gpus_share_them_when_no_list_is_given(tmp_path):
    driver = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:41:00.0", "0000:81:00.0", "0000:c1:00.0"):
        (driver / bus).mkdir(parents=True)
    assert node_gpu_count(driver) == 4 and node_gpu_count(tmp_path / "absent") is None
    assert [pinned_devices(rank, None, gpus=4) for rank in range(6)] == ["0", "1", "2", "3", "0", "1"]
    assert pinned_devices(5, None, gpus=None) == "5"  # GPU count unknown: the rank itself, as before


def test_pin_device_sets_cuda_visible_devices_and_says_so(monkeypatch):
    import f2d_bench.launch.environment as environment

    monkeypatch.setattr(environment, "node_gpu_count", lambda: 2)  # a node with two GPUs, on any machine
    launch = detect_launch({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    env: dict[str, str] = {}
    line = pin_device(launch, env)
    assert env == {"CUDA_VISIBLE_DEVICES": "1"} and "local rank 1" in line and "'1'" in line
    array_only = detect_launch({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"})
    env = {}
    assert "config" in pin_device(array_only, env) and env == {}


def test_cli_refuses_shard_with_ray(capsys):
    assert main(["generate", "--preset", "smoke", "--ray", "--shard", "1/2"]) == 2
    assert "leave out --shard" in capsys.readouterr().err
    assert main(["tune", "--preset", "smoke", "--workers", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert main(["generate", "--preset", "smoke", "--ray-shards", "0"]) == 2  # 0 is a value, not "not given"
    assert "go with --ray" in capsys.readouterr().err


def test_cli_shard_auto_without_launcher_is_a_clear_error(monkeypatch, capsys):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert main(["generate", "--preset", "smoke", "--shard", "auto"]) == 2
    assert "found no launcher" in capsys.readouterr().err


def test_tune_shard_auto_says_which_launcher_and_tunes_that_shard(monkeypatch, capsys):
    from f2d_bench import api

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    calls = []

    class Done:
        def text(self):
            return "tuned"

    monkeypatch.setattr(api, "tune", lambda config, **kw: calls.append(kw) or Done())
    assert main(["tune", "--preset", "smoke", "--shard", "auto", "--no-progress"]) == 0
    assert calls[0]["shard"] == Shard(2, 2)
    out = capsys.readouterr().out
    assert "--shard auto: SLURM array (SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=2) -> shard 2/2" in out


def test_shard_auto_refuses_a_resubmitted_part_of_an_array_that_would_change_the_layout(monkeypatch, tmp_path,
                                                                                       capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(faces=str(face_dir(tmp_path / "faces", ("obama", "biden"))),
                                                       seeds=[0])))
    out = tmp_path / "run"
    assert main(["generate", "--config", str(config), "--out", str(out), "--shard", "1/2", "--no-progress"]) == 0
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # `sbatch --array=1` to rerun task 1 of an --array=0-1: alone, it is an array of one task
    for name, value in {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "1",
                        "SLURM_ARRAY_TASK_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    before = sorted(p.name for p in (out / "manifests").glob("*.jsonl"))
    assert main(["generate", "--config", str(config), "--out", str(out), "--shard", "auto", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "makes 1 shard(s)" in err and "generated as 2 shards" in err, err
    assert "--shard $((SLURM_ARRAY_TASK_ID + 1))/2" in err
    assert sorted(p.name for p in (out / "manifests").glob("*.jsonl")) == before == ["shard-1-of-2.jsonl"]
    # the whole array again (--array=0-1) keeps the layout: task 1 is shard 2/2
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(["generate", "--config", str(config), "--out", str(out), "--shard", "auto", "--no-progress"]) == 0
    assert RunDir(out).store.layouts() == {2}


# --- real processes under simulated launchers ---------------------------------------------------------


def _launch_all(cmd: list[str], envs: list[dict], tmp_path) -> list[str]:
    """Start one process per environment at once (as the launcher would), wait for all; their outputs."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and k != "CUDA_VISIBLE_DEVICES"}
    procs = []
    for i, env in enumerate(envs):
        log = open(tmp_path / f"proc-{i}.log", "wb")  # a file, not a pipe: a full pipe would block the child
        procs.append((subprocess.Popen(cmd, cwd=REPO, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT),
                      log))
    outputs = []
    for i, (proc, log) in enumerate(procs):
        proc.wait(timeout=400)
        log.close()
        text = (tmp_path / f"proc-{i}.log").read_text()
        assert proc.returncode == 0, text[-3000:]
        outputs.append(text)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("launcher, envs", TWO_PROCESS_LAUNCHERS)
def test_shard_auto_processes_together_make_the_unsharded_set(launcher, envs, tmp_path):
    faces = face_dir(tmp_path / "faces", ["obama", "biden", "grace_hopper"])
    # Batch 1: every image is its own batch in any shard, so sharded pixels equal unsharded ones exactly.
    data = small_config_dict(faces=str(faces), seeds=[0, 1], batch_size=1)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "f2d_bench", "generate", "--config", str(cfg), "--shard", "auto", "--no-progress",
           "--out", str(out)]
    outputs = _launch_all(cmd, envs, tmp_path)
    for i, text in enumerate(outputs):
        assert f"--shard auto: {launcher}" in text and f"shard {i + 1}/2" in text, text[-2000:]
    run = RunDir(out)
    writers = {r.key: r.writer for r in run.store.manifest_records().values()}
    assert set(writers) == set(run.keys()) and set(writers.values()) == {Shard(1, 2).tag, Shard(2, 2).tag}
    assert all(Shard(int(w.split("-")[1]), 2).owns(k) for k, w in writers.items())
    assert not run.store.temporary_files()
    clean = tmp_path / "clean"
    generate_run(config_from_dict(data), clean, progress=False)
    assert run_hashes(out) == run_hashes(clean)
    assert main(["status", str(out)]) == 0
