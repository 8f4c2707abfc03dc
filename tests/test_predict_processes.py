"""predict over several processes (``trainer=ddp_cpu``): the same files and CSV as one process, each
image done by one rank once; settings predict cannot run refused before a model is read."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidseg.core.errors import ConfigError, DataError
from covidseg.data.synthetic import make_phantom
from covidseg.inference.manifest import PARTS, RECORD
from covidseg.inference.segment import runtime_threads
from covidseg.predict import predict


def _outputs(output: Path) -> dict[str, bytes]:
    return {str(path.relative_to(output)): path.read_bytes() for path in sorted(output.rglob("*.png"))}


def _rows(output: Path) -> list[dict]:
    with (output / "predictions.csv").open() as handle:
        return [{key: value for key, value in row.items() if key != "seconds"} for row in csv.DictReader(handle)]


def test_two_processes_write_the_same_files_and_csv_as_one(compose_cfg, trained_checkpoints, tmp_path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(4)
    for index in range(9):  # an odd count over two ranks, batches of 2: uneven shards, a short last batch
        place = folder / "sub" if index % 3 == 0 else folder
        cv2.imwrite(str(place / f"{index}.png"), make_phantom(rng, 80 + 8 * index, infected=index % 2 == 0)[0])
    (folder / "broken.png").write_bytes(b"not an image")
    model = [f"ckpt_path={trained_checkpoints[0]}", f"input={folder}", "batch_size=2", "save_probability=true"]
    one = predict(compose_cfg("predict", [*model, f"output={tmp_path / 'one'}"]))
    two = predict(
        compose_cfg("predict", [*model, f"output={tmp_path / 'two'}", "trainer=ddp_cpu", "trainer.devices=2"])
    )
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one") and len(_outputs(tmp_path / "one")) == 9 * 3
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one") and len(two.rows) == 9
    assert [(path.name, reason) for path, reason in two.skipped] == [
        (path.name, reason) for path, reason in one.skipped
    ]
    assert [path.name for path, _ in two.skipped] == ["broken.png"]
    lines = [json.loads(line) for line in (tmp_path / "two" / RECORD).read_text().splitlines()]
    assert sorted(Path(line["input"]).name for line in lines) == sorted(f"{index}.png" for index in range(9))
    assert not (tmp_path / "two" / PARTS).exists()
    # everything finished: a rerun over two processes starts none and writes the same CSV
    again = predict(compose_cfg("predict", [*model, f"output={tmp_path / 'two'}", "trainer=ddp_cpu"]))
    assert len(again.rows) == 9 and _rows(tmp_path / "two") == _rows(tmp_path / "one")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer=gpu", "trainer.accelerator=gpu: predict runs its networks on the CPU"),
        ("trainer.devices=0", "trainer.devices=0: expected a whole number of CPU processes >= 1"),
        ("trainer.devices=auto", "trainer.devices=auto: expected a whole number"),
        ("+trainer.strategy=fsdp", "trainer.strategy=fsdp: predict runs with auto"),
        ("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed: predict keeps its loop in fp32"),
        ("trainer.fast_dev_run=true", "trainer.fast_dev_run=True: predict does every image"),
        ("+trainer.limit_predict_batches=1", "trainer.limit_predict_batches=1: predict does every image"),
    ],
)
def test_settings_predict_cannot_run_are_refused_in_one_line(compose_cfg, tmp_path, override, message) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((32, 32), np.uint8))
    cfg = compose_cfg("predict", ["ckpt_path=missing.ckpt", f"input={folder}", f"output={tmp_path / 'out'}", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        predict(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("value", "threads"), [("2", 2), (" 1 ", 1), ("0", None), ("many", None), (None, None)])
def test_runtimes_take_the_processes_share_of_the_cores(monkeypatch, value, threads) -> None:
    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert runtime_threads() == threads


def test_two_nodes_share_one_output_as_one_process_would(compose_cfg, trained_checkpoints, tmp_path) -> None:
    """Two commands as two machines would run them (``trainer.num_nodes=2``, ``NODE_RANK`` 0 and 1, one
    process each, here on one machine): the first keeps the record and writes the CSV."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for index in range(7):
        cv2.imwrite(str(folder / f"{index}.png"), make_phantom(rng, 96, infected=index % 2 == 1)[0])
    model = [f"ckpt_path={trained_checkpoints[0]}", f"input={folder}", "batch_size=2"]
    predict(compose_cfg("predict", [*model, f"output={tmp_path / 'one'}"]))
    with socket.socket() as probe:  # a free port for the processes to meet at
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "covidseg.predict", *model, f"output={tmp_path / 'two'}", "trainer=ddp_cpu",
               "trainer.devices=1", "trainer.num_nodes=2"]  # fmt: skip
    meet = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [
        subprocess.Popen([*command, f"hydra.run.dir={tmp_path / f'run{rank}'}"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=os.environ | meet | {"NODE_RANK": str(rank)})
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one") and _rows(tmp_path / "two") == _rows(
        tmp_path / "one"
    )
    assert "7 image(s) predicted" in outputs[0] and "rank 1 of 2: 3/3 images" in outputs[1]


def test_a_parts_folder_that_is_a_link_or_a_pipe_part_is_refused_in_one_line(
    compose_cfg, trained_checkpoints, tmp_path
) -> None:
    """Parts written through a link would land outside the output and be lost; a pipe named like a
    part would block the fold forever."""
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), make_phantom(np.random.default_rng(0), 64, infected=True)[0])
    model = [f"ckpt_path={trained_checkpoints[0]}", f"input={folder}"]
    linked = tmp_path / "linked"
    predict(compose_cfg("predict", [*model, f"output={linked}"]))
    (tmp_path / "elsewhere").mkdir()
    (linked / PARTS).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"\.covidseg-predict\.parts' is not a folder covidseg made"):
        predict(compose_cfg("predict", [*model, f"output={linked}", "resume=false"]))
    assert list((tmp_path / "elsewhere").iterdir()) == []
    piped = tmp_path / "piped"
    predict(compose_cfg("predict", [*model, f"output={piped}"]))
    (piped / PARTS).mkdir()
    os.mkfifo(piped / PARTS / "part-0.jsonl")
    with pytest.raises(DataError, match="is not a regular file"):
        predict(compose_cfg("predict", [*model, f"output={piped}"]))


def test_record_lines_not_of_covidsegs_making_are_left_out(compose_cfg, trained_checkpoints, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        cv2.imwrite(str(folder / f"{index}.png"), make_phantom(np.random.default_rng(index), 64, infected=True)[0])
    cfg = compose_cfg("predict", [f"ckpt_path={trained_checkpoints[0]}", f"input={folder}", f"output={tmp_path / 'o'}"])
    predict(cfg)
    record = tmp_path / "o" / RECORD
    lines = record.read_text().splitlines()
    broken = json.loads(lines[0])
    del broken["row"]  # "predicted" without its CSV row
    odd = [json.dumps(broken), json.dumps({"input": 3, "status": "refused"}), "[1, 2]", lines[1]]
    record.write_text("\n".join(odd) + "\n")
    run = predict(cfg)  # the first image is predicted again, the second kept
    assert [Path(row["file"]).name for row in run.rows] == ["0.png", "1.png"]
    assert len(record.read_text().splitlines()) == 2
