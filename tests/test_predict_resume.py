"""predict continues where a killed or failed run stopped: nothing finished is done again, nothing is
lost, and the CSV and masks are those of one uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import covidseg.inference.prediction_loop as loop_module
from covidseg.core.errors import DataError
from covidseg.data.synthetic import make_phantom
from covidseg.inference.manifest import PARTS, RECORD
from covidseg.predict import predict


@pytest.fixture
def phantoms(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):
        cv2.imwrite(str(folder / f"{index:02d}.png"), make_phantom(rng, 96, infected=index % 2 == 0)[0])
    (folder / "broken.png").write_bytes(b"\x89PNG not really")  # skipped, and recorded as skipped
    return folder


def _rows(output: Path) -> list[dict]:
    with (output / "predictions.csv").open() as handle:
        return [{key: value for key, value in row.items() if key != "seconds"} for row in csv.DictReader(handle)]


def _masks(output: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(output.glob("*.mask.png"))}


def test_a_run_stopped_half_way_is_finished_by_the_next_one_as_one_run_would_be(
    compose_cfg, trained_checkpoints, phantoms, tmp_path, monkeypatch
) -> None:
    model = f"ckpt_path={trained_checkpoints[0]}"
    whole = tmp_path / "whole"
    predict(compose_cfg("predict", [model, f"input={phantoms}", f"output={whole}", "batch_size=2"]))

    written: list[Path] = []
    real_write = loop_module.write_outputs

    def dies_after_five(result, stem, save_probability, inputs) -> None:
        if len(written) == 5:
            raise SystemExit("killed")  # the process ends here: no CSV, no clean-up
        real_write(result, stem, save_probability, inputs)
        written.append(stem)

    monkeypatch.setattr(loop_module, "write_outputs", dies_after_five)
    resumed = tmp_path / "resumed"
    cfg = compose_cfg("predict", [model, f"input={phantoms}", f"output={resumed}", "batch_size=2"])
    with pytest.raises(SystemExit):
        predict(cfg)
    assert not (resumed / "predictions.csv").exists()
    recorded = (resumed / RECORD).read_text().splitlines()
    assert 1 <= len(recorded) <= 5  # the batches whose images were all written (not the unreadable one)

    monkeypatch.setattr(loop_module, "write_outputs", lambda *args: (written.append(args[1]), real_write(*args)))
    written.clear()
    run = predict(cfg)
    done_before = {Path(line.split('"input": "')[1].split('"')[0]).name for line in recorded}
    assert {stem.name for stem in written} == {f"{i:02d}.png" for i in range(12)} - done_before  # only the rest
    assert len(run.skipped) == 1 and run.failed == []
    assert _rows(resumed) == _rows(whole) and _masks(resumed) == _masks(whole)

    # a third run finds everything finished: nothing is written again, the CSV is the same
    written.clear()
    predict(cfg)
    assert written == [] and _rows(resumed) == _rows(whole)


def test_a_torn_record_line_redoes_that_image_only(compose_cfg, trained_checkpoints, phantoms, tmp_path) -> None:
    model = f"ckpt_path={trained_checkpoints[0]}"
    output = tmp_path / "out"
    cfg = compose_cfg("predict", [model, f"input={phantoms}", f"output={output}"])
    predict(cfg)
    lines = (output / RECORD).read_text().splitlines()
    (output / RECORD).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # the last line cut mid-write
    before = _rows(output)
    (output / "11.png.mask.png").unlink()  # the image the torn line recorded, were it the last one written
    run = predict(cfg)
    assert _rows(output) == before and len(run.rows) == 12
    # an input changed since it was predicted is predicted again; the others are not
    stamp = (output / "00.png.mask.png").stat().st_mtime_ns
    cv2.imwrite(str(phantoms / "03.png"), make_phantom(np.random.default_rng(9), 96, infected=True)[0])
    predict(cfg)
    assert (output / "00.png.mask.png").stat().st_mtime_ns == stamp
    assert (output / "03.png.mask.png").stat().st_mtime_ns > stamp


def test_another_model_or_setting_is_refused_unless_resume_is_false(
    compose_cfg, trained_checkpoints, phantoms, tmp_path
) -> None:
    output = tmp_path / "out"
    first = [f"input={phantoms}", f"output={output}"]
    predict(compose_cfg("predict", [f"ckpt_path={trained_checkpoints[0]}", *first]))
    for changed in ([f"ckpt_path={trained_checkpoints[1]}"], [f"ckpt_path={trained_checkpoints[0]}", "threshold=0.3"]):
        with pytest.raises(DataError, match="holds predictions of another model or other settings.*resume=false"):
            predict(compose_cfg("predict", [*changed, *first]))
    again = predict(compose_cfg("predict", [f"ckpt_path={trained_checkpoints[0]}", "threshold=0.3", *first,
                                            "resume=false"]))  # fmt: skip
    assert len(again.rows) == 12 and all(float(row["infected_pixels"]) >= 0 for row in again.rows)
    # a folder from before records (an empty marker) is predicted afresh, not refused
    (output / ".covidseg-predict").write_text("")
    assert len(predict(compose_cfg("predict", [f"ckpt_path={trained_checkpoints[0]}", *first])).rows) == 12


def _finished(output: Path) -> dict[str, str]:
    """Finished images (input name -> line) in the record and the ranks' parts; a torn line left out."""
    finished = {}
    for path in [output / RECORD, *sorted((output / PARTS).glob("part-*.jsonl"))]:
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry["status"] in ("predicted", "refused"):
                finished[Path(entry["input"]).name] = line
    return finished


def test_sigkill_half_way_then_a_rerun_finishes_only_the_rest(trained_checkpoints, tmp_path) -> None:
    """Two processes killed together half-way (one process stopped half-way: the first test)."""
    processes = 2
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    count = 80
    for index in range(count):
        cv2.imwrite(str(folder / f"{index:02d}.png"), make_phantom(rng, 96, infected=True)[0])
    output = tmp_path / "out"
    spread = ["trainer=ddp_cpu", f"trainer.devices={processes}"]
    command = [sys.executable, "-m", "covidseg.predict", f"ckpt_path={trained_checkpoints[0]}", f"input={folder}",
               f"output={output}", "batch_size=1", *spread, f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    # its own process group: the kill takes the started processes with it, as a scheduler's would
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(_finished(output)) < 10:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)  # the started processes are gone with the group
    finished = _finished(output)
    assert 10 <= len(finished) < count, "the run was not stopped half-way"
    stamps = {name: (output / f"{name}.mask.png").stat().st_mtime_ns for name in finished}
    done = subprocess.run([*command[:-1], f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming: {len(finished)} of {count}" in done.stdout + done.stderr
    assert {name: (output / f"{name}.mask.png").stat().st_mtime_ns for name in finished} == stamps  # not redone
    lines = (output / RECORD).read_text().splitlines()
    assert len(lines) == count and len({json.loads(line)["input"] for line in lines}) == count  # each image once
    assert not (output / PARTS).exists()  # folded into the record
    with (output / "predictions.csv").open() as handle:
        assert [row["file"] for row in csv.DictReader(handle)] == [str(folder / f"{i:02d}.png") for i in range(count)]


def test_sigterm_stops_predict_after_its_batch_keeping_what_it_finished(trained_checkpoints, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for index in range(80):
        cv2.imwrite(str(folder / f"{index:02d}.png"), make_phantom(rng, 96, infected=True)[0])
    output = tmp_path / "out"
    command = [sys.executable, "-m", "covidseg.predict", f"ckpt_path={trained_checkpoints[0]}", f"input={folder}",
               f"output={output}", "batch_size=1", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(_finished(output)) < 5:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143, process.stderr.read()[-2000:]
    assert not (output / PARTS).exists()  # its part folded into the record on the way out
    finished = len((output / RECORD).read_text().splitlines())
    assert 5 <= finished < 80, "the run was not stopped half-way"
    done = subprocess.run([*command[:-1], f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True, text=True)
    assert done.returncode == 0 and f"resuming: {finished} of 80" in done.stdout + done.stderr


def test_a_batchs_files_reach_the_disk_before_its_images_are_recorded_as_finished(
    compose_cfg, trained_checkpoints, phantoms, tmp_path, monkeypatch
) -> None:
    """One flush per batch instead of a sync per file: each flush comes after the batch's PNGs are
    in place and before its lines are in the record, so a recorded image's files are on the disk."""
    output = tmp_path / "out"
    seen: list[tuple[int, int]] = []  # (PNG files in place, images recorded as finished) at each flush

    def flush() -> None:
        seen.append((len(list(output.glob("*.png"))), len(_finished(output))))

    monkeypatch.setattr(loop_module, "flush_to_disk", flush)
    model = f"ckpt_path={trained_checkpoints[0]}"
    done = predict(compose_cfg("predict", [model, f"input={phantoms}", f"output={output}", "batch_size=4"]))
    kinds = len(list(output.glob("00.png.*.png")))  # mask, overlay (and lungs)
    # 13 files in batches of 4; the last holds only the unreadable one: nothing to flush
    assert len(done.rows) == 12 and seen == [(kinds * 4 * (batch + 1), 4 * batch) for batch in range(3)]


def test_the_writer_overlaps_the_next_batch_and_its_error_stops_predict_after_what_it_recorded(
    compose_cfg, trained_checkpoints, phantoms, tmp_path, monkeypatch
) -> None:
    """A batch is written in the writer's thread while the next is predicted; an error there (the
    disk full as its lines are recorded) stops predict with that error, the batches before it
    recorded, and a rerun does the rest."""
    from covidseg.inference.manifest import Manifest

    output = tmp_path / "out"
    threads: set[str] = set()
    real_write = loop_module.write_outputs
    monkeypatch.setattr(
        loop_module, "write_outputs", lambda *args: (threads.add(threading.current_thread().name), real_write(*args))
    )
    real_record, calls = Manifest.record, []

    def full_disk_on_the_second_batch(self, entries):
        calls.append(len(entries))
        if len(calls) == 2:
            raise DataError(f"output {str(output)!r}: No space left on device")
        return real_record(self, entries)

    monkeypatch.setattr(Manifest, "record", full_disk_on_the_second_batch)
    cfg = compose_cfg("predict", [f"ckpt_path={trained_checkpoints[0]}", f"input={phantoms}", f"output={output}",
                                  "batch_size=4"])  # fmt: skip
    with pytest.raises(DataError, match="No space left on device"):
        predict(cfg)
    assert threads and all(name.startswith("covidseg-writer") for name in threads)
    assert len(_finished(output)) == 4  # the first batch, and not the one whose lines could not be written
    monkeypatch.undo()
    rerun = compose_cfg("predict", [f"ckpt_path={trained_checkpoints[0]}", f"input={phantoms}", f"output={output}",
                                    "batch_size=4"])  # fmt: skip
    assert len(predict(rerun).rows) == 12 and len(_finished(output)) == 12


def test_a_ctrl_c_while_the_loop_waits_for_the_writer_still_records_that_batch(
    compose_cfg, trained_checkpoints, phantoms, tmp_path, monkeypatch
) -> None:
    output = tmp_path / "out"
    real_wait, calls = loop_module.wait, []

    def interrupted_once(futures):
        calls.append(1)
        if len(calls) == 1:  # the first wait, for the first batch still being written
            raise KeyboardInterrupt
        return real_wait(futures)

    monkeypatch.setattr(loop_module, "wait", interrupted_once)
    cfg = compose_cfg("predict", [f"ckpt_path={trained_checkpoints[0]}", f"input={phantoms}", f"output={output}",
                                  "batch_size=4"])  # fmt: skip
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        predict(cfg)
    assert len(calls) == 2  # on the way out, the batch being written was waited for
    finished = _finished(output)
    assert len(finished) == 4 and all((output / f"{name}.mask.png").is_file() for name in finished)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("covidseg-writer")]
