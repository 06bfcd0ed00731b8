"""Data-parallel training on 2 CPU processes (gloo) with the tiny model: same result as 1 process, one run
directory, failures that stop every process, resume; and the device/precision options' error paths.

Tolerances: 2 processes split every micro-batch in two and DistributedDataParallel averages the two
gradients, so the sums are added in another order than on 1 process; with dropout off (each process
draws its own dropout masks, which 1 process cannot reproduce) the weights agree to ~1e-6 after 24
steps. The tests allow 1e-4 (absolute, weights of magnitude ~1) and 1e-4 relative on the logged losses;
the predictions (accuracy, per-class counts) must be equal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.fault_injection import FAULT_MODE_ENV, FAULT_RANK_ENV, run_cli, torchrun_faulted_at
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError
from tuneforge.train.distributed import DistributedError, resolve_device
from tuneforge.train.loop import train

WEIGHT_ATOL = 1e-4
LOSS_RTOL = 1e-4
FAULT_SCRIPT = Path(__file__).with_name("fault_injection.py")


def _config(tiny_model_dir: Path, tiny_data: dict, out: Path, *, dropout: float = 0.0, **train: object) -> dict:
    raw = tiny_config(tiny_model_dir, tiny_data, out, **{"epochs": 3, **train})
    raw["model"].update(hidden_dropout=dropout, attention_dropout=dropout, classifier_dropout=dropout)
    return raw


def _write(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _assert_same_run(one: Path, two: Path, *, exact: bool) -> None:
    a, b = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert a[split]["accuracy"] == b[split]["accuracy"], split
        assert a[split]["confusion_matrix"] == b[split]["confusion_matrix"], split
    for key in ("steps", "best_step", "epochs_completed", "stopped_early"):
        assert a["train"][key] == b["train"][key], key
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys()
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], atol=WEIGHT_ATOL, rtol=0, msg=name)
    la, lb = _log(one), _log(two)
    assert [r["step"] for r in la] == [r["step"] for r in lb], "one log line per step, written once"
    for ra, rb in zip(la, lb, strict=True):
        if "loss" in ra:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=LOSS_RTOL)
        else:
            assert ra["value"] == rb["value"] and ra["improved"] == rb["improved"]


def test_two_processes_end_like_one_with_the_same_global_batch(
    tiny_model_dir: Path, tiny_data: dict, trained_tiny_run: Path, tmp_path: Path
) -> None:
    # Distillation too: each process scores its share of the texts with the teacher, the shares are summed.
    distill = {"teacher": str(trained_tiny_run), "alpha": 0.5, "temperature": 2.0}
    runs = {}
    for name in ("one", "two"):
        raw = _config(tiny_model_dir, tiny_data, tmp_path / "runs" / name, epochs=6, eval_every_steps=8)
        raw["distill"] = distill
        runs[name] = _write(raw, tmp_path / f"{name}.yaml")
    caches = {name: tmp_path / f"cache-{name}" for name in runs}

    one = run_cli(["train", str(runs["one"]), "--no-progress"], env={"TUNEFORGE_CACHE": str(caches["one"])})
    assert one.returncode == 0, one.stderr
    two = run_cli(
        ["train", str(runs["two"]), "--no-progress", "--nproc", "2"], env={"TUNEFORGE_CACHE": str(caches["two"])}
    )
    assert two.returncode == 0, two.stderr
    assert "2 processes on cpu" in two.stderr

    # One run directory, written by rank 0 alone: nothing else beside it, no staging or checkpoints left.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"]
    assert not (tmp_path / "runs" / "two" / "checkpoints").exists()
    _assert_same_run(tmp_path / "runs" / "one", tmp_path / "runs" / "two", exact=False)
    metrics = json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 60.0, "the 2-process run learns (chance is 33%)"
    # The teacher cache holds every text, though each process scored only its half.
    from tuneforge.train.distill import TeacherLogitsCache

    for cache in caches.values():
        (file,) = (cache / "teacher-logits").glob("*.safetensors")
        assert len(TeacherLogitsCache(file, 3)) == metrics["train"]["examples"]


def test_early_stopping_is_decided_alike_on_every_process(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    # As in test_train: a learning rate of ~0 never improves, so patience 1 stops at the second evaluation.
    raw = _config(
        tiny_model_dir,
        tiny_data,
        tmp_path / "run",
        epochs=6,
        learning_rate=1e-9,
        head_learning_rate=1e-9,
        early_stopping_patience=1,
        eval_every_steps=2,
    )
    result = run_cli(["train", str(_write(raw, tmp_path / "c.yaml")), "--no-progress", "--nproc", "2"])
    assert result.returncode == 0, result.stderr  # a process that went on alone would hang, then fail
    info = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert info["stopped_early"] is True and info["steps"] == 4 and info["best_step"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(step: int, args: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
    """Two processes started by hand, as on two machines (no torchrun agent to stop the survivor)."""
    port = str(_free_port())
    processes = []
    for rank in (0, 1):
        place = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"}
        place.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        processes.append(
            subprocess.Popen(
                [sys.executable, str(FAULT_SCRIPT), str(step), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **place, **env},
            )
        )
    return processes


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_process_stops_the_other_with_its_error(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path, mode: str
) -> None:
    config = _write(_config(tiny_model_dir, tiny_data, tmp_path / "run"), tmp_path / "c.yaml")
    env = {FAULT_RANK_ENV: "1", FAULT_MODE_ENV: mode}
    processes = _start_ranks(3, ["train", str(config), "--no-progress"], env)
    try:
        outputs = [p.communicate(timeout=180) for p in processes]  # a hang fails here
    finally:
        for p in processes:
            p.kill()
    codes = [p.returncode for p in processes]
    survivor = outputs[0][1]
    if mode == "raise":
        assert codes[1] == 1 and "RuntimeError: injected fault at step 3" in outputs[1][1]
        assert codes[0] == 2, survivor
        assert (
            "error: stopped because another training process failed: rank 1: RuntimeError: injected fault at step 3"
            in survivor
        )
    else:
        assert codes[1] == -signal.SIGKILL
        assert codes[0] == 2, survivor
        assert "error: rank 0: lost contact with the other training processes" in survivor
    assert "Traceback" not in survivor
    assert not (tmp_path / "run").exists(), "a failed run is never published"


def test_a_process_that_hangs_is_given_up_on_after_the_timeout(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    # Under torchrun: rank 1 stops answering; rank 0's next collective times out (TUNEFORGE_DIST_TIMEOUT), it
    # exits with the error, and the agent then stops rank 1.
    config = _write(_config(tiny_model_dir, tiny_data, tmp_path / "run"), tmp_path / "c.yaml")
    env = {FAULT_RANK_ENV: "1", FAULT_MODE_ENV: "hang", "TUNEFORGE_DIST_TIMEOUT": "5"}
    started = time.monotonic()
    result = torchrun_faulted_at(3, 2, ["train", str(config), "--no-progress"], env=env)
    assert result.returncode != 0
    assert "lost contact with the other training processes (Timed out" in result.stderr
    assert time.monotonic() - started < 240, "gave up long after the timeout"


def test_a_resumed_two_process_run_matches_an_uninterrupted_one(
    tiny_model_dir: Path, tiny_data: dict, tmp_path: Path
) -> None:
    # Dropout on: each process's random state is in the checkpoint. 8 steps per epoch, checkpoint every 4.
    configs = {
        name: _write(_config(tiny_model_dir, tiny_data, tmp_path / name, dropout=0.2), tmp_path / f"{name}.yaml")
        for name in ("straight", "killed", "fewer")
    }
    straight = run_cli(["train", str(configs["straight"]), "--no-progress", "--nproc", "2"])
    assert straight.returncode == 0, straight.stderr

    killed = torchrun_faulted_at(11, 2, ["train", str(configs["killed"]), "--no-progress"], env={FAULT_RANK_ENV: "1"})
    assert killed.returncode != 0
    state = json.loads((tmp_path / "killed.partial" / "checkpoints" / "last" / "state.json").read_text())
    assert state["loop"]["step"] == 8
    saved = load_file(tmp_path / "killed.partial" / "checkpoints" / "last" / "optimizer.safetensors")
    assert {"__rng_torch__", "__rng_torch__.1"} <= set(saved), "both processes' random states are kept"
    # A copy of the interrupted run, for "fewer" to resume on 1 process (its config names its own folder).
    shutil.copytree(tmp_path / "killed.partial", tmp_path / "fewer.partial")
    saved_config = yaml.safe_load((tmp_path / "fewer.partial" / "config.yaml").read_text())
    saved_config["output"]["dir"] = str(tmp_path / "fewer")
    (tmp_path / "fewer.partial" / "config.yaml").write_text(yaml.safe_dump(saved_config))

    resumed = run_cli(["train", str(configs["killed"]), "--resume", "--no-progress", "--nproc", "2"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    _assert_same_run(tmp_path / "straight", tmp_path / "killed", exact=True)

    # On 1 process: the same batches and steps (each whole batch now on one process), new dropout masks.
    fewer = run_cli(["train", str(configs["fewer"]), "--resume", "--no-progress"])
    assert fewer.returncode == 0, fewer.stderr
    assert "the interrupted run had 2 process(es), this one has 1" in fewer.stderr
    info = json.loads((tmp_path / "fewer" / "metrics.json").read_text())["train"]
    assert info["steps"] == 24 and info["epochs_completed"] == 3


def test_nproc_is_checked_before_any_process_starts(
    tiny_model_dir: Path,
    tiny_data: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tuneforge import cli

    config = _write(_config(tiny_model_dir, tiny_data, tmp_path / "run"), tmp_path / "c.yaml")
    assert cli.main(["train", str(config), "--nproc", "0"]) == 2
    assert "error: --nproc: must be at least 1" in capsys.readouterr().err
    semi = _config(tiny_model_dir, tiny_data, tmp_path / "run", semi_supervised={})
    semi["data"]["unlabeled"] = str(tiny_data["test"])
    assert cli.main(["train", str(_write(semi, tmp_path / "semi.yaml")), "--nproc", "2"]) == 2
    assert "train.semi_supervised: self-training runs on one process" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", str(config), "--nproc", "2"]) == 2
    assert "already started by a launcher" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- device and precision


def test_device_cuda_without_a_gpu_names_the_key(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"^train\.device: cuda was asked for, but torch sees no GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    raw = _config(tiny_model_dir, tiny_data, tmp_path / "run", device="cuda")
    with pytest.raises(ConfigError, match=r"train\.device"):
        train(validate_config(raw), show_progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_fp16_needs_a_gpu(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision fp16 needs device cuda"):
        validate_config(_config(tiny_model_dir, tiny_data, tmp_path / "run", device="cpu", precision="fp16"))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto resolves to it")
    raw = _config(tiny_model_dir, tiny_data, tmp_path / "run", precision="fp16")  # device auto → the CPU here
    with pytest.raises(ConfigError, match=r"^train\.precision: fp16 needs a GPU"):
        train(validate_config(raw), show_progress=False)


def test_bf16_autocast_trains_on_the_cpu(tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    raw = _config(tiny_model_dir, tiny_data, tmp_path / "run", epochs=8, precision="bf16", device="cpu")
    result = train(validate_config(raw), show_progress=False)
    assert result.metrics["test"]["accuracy"] > 60.0
    # The weights stay float32: only the forward passes ran in bfloat16.
    assert {t.dtype for t in _weights(result.run_dir).values()} == {torch.float32}


def test_a_communication_error_without_a_message_is_reported_as_lost_contact() -> None:
    from tuneforge.train.distributed import Dist, _share_failure

    broken = RuntimeError("[/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:4242: Connection reset by peer.")
    with pytest.raises(DistributedError, match=r"rank 1: lost contact .* \(Read error \[10\.0\.0\.2\]:4242"):
        _share_failure(Dist(rank=1, world_size=2), broken)
    _share_failure(Dist(rank=1, world_size=2), ValueError("a bug of this process"))  # left to propagate as it is


# --------------------------------------------------------------------------- inference on a GPU (error paths here)


def test_onnx_runtime_uses_its_cuda_provider_only_when_installed() -> None:
    from tuneforge.errors import ModelError
    from tuneforge.models.onnx_runtime import execution_providers

    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    with_gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers("cpu", with_gpu) == ["CPUExecutionProvider"]
    assert execution_providers("auto", cpu_only) == ["CPUExecutionProvider"]
    assert execution_providers("auto", with_gpu) == with_gpu
    assert execution_providers("cuda", with_gpu) == with_gpu
    with pytest.raises(ModelError, match=r"device: cuda was asked for.*pip install onnxruntime-gpu"):
        execution_providers("cuda", cpu_only)
    with pytest.raises(ModelError, match="device: must be cpu, cuda or auto"):
        execution_providers("gpu", with_gpu)


def test_predictor_and_server_take_a_device(trained_tiny_run: Path) -> None:
    from tuneforge.errors import ModelError, TuneforgeError
    from tuneforge.infer.predictor import Predictor
    from tuneforge.serve.settings import ServeSettings

    texts = ["a lovely superb film", "an awful boring plot"]
    expected = [p.to_dict() for p in Predictor(trained_tiny_run).predict(texts)]
    assert [p.to_dict() for p in Predictor(trained_tiny_run, device="auto").predict(texts)] == expected
    with pytest.raises(ModelError, match="device: must be one of cpu, cuda, auto"):
        Predictor(trained_tiny_run, device="gpu")
    with pytest.raises(TuneforgeError, match="--device: must be one of cpu, cuda, auto"):
        ServeSettings(run_dir=trained_tiny_run, device="gpu").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="device: cuda was asked for, but torch sees no GPU"):
            Predictor(trained_tiny_run, device="cuda")
