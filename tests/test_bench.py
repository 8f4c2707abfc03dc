import json
from pathlib import Path

import pytest
from conftest import FAST
from helpers import run_command

from covidseg.benchmarks import predict as predict_bench
from covidseg.benchmarks import serve as serve_bench
from covidseg.benchmarks import throughput as bench
from covidseg.inference.prediction_loop import WRITER_STAGE
from covidseg.models import UNet
from covidseg.predict import STAGES


@pytest.mark.slow
def test_bench_reports_every_figure_on_a_tiny_model(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("train", FAST)
    results = bench.run(cfg, steps=2, warmup=1, rounds=2)
    for figure in [
        "matmul_gflops", "train_img_s", "train_loop_img_s", "train_bare_img_s", "train_gflops", "train_efficiency",
        "infer_img_s", "infer_gflops", "infer_efficiency", "data_img_s", "train_peak_rss_mb", "first_batch_s",
    ]:  # fmt: skip
        assert results[figure] > 0, figure
    assert results["train_gflop_per_img"] > 2.5 * results["infer_gflop_per_img"] > 0
    ratios = [results[f"framework_overhead_ratio{end}"] for end in ("_min", "", "_max")]
    assert all(0 < ratio < 100 for ratio in ratios)  # both loops timed, each round a finite ratio
    variants = results["variants"]
    assert {"train fp32", "train bf16+NHWC", "infer fp32+NHWC", "infer onnxruntime fp32"} <= set(variants)
    assert variants["train fp32"]["speedup"] == 1 and all(
        v["min"] <= v["median"] <= v["max"] for v in variants.values()
    )
    assert "| infer onnxruntime fp32 |" in bench.variants_markdown(variants)
    compiled = {"median": 4.0, "min": 3.0, "max": 5.0, "speedup": 2.0, "first_step_s": 31.25}
    assert "| train bf16+NHWC+compile | 4.00 | 3.00–5.00 | 2.00 | 31.2 s |" in bench.variants_markdown(
        {"train bf16+NHWC+compile": compiled}
    )
    assert "not met" in bench.markdown({"first_batch_s": 6.0}) and "(met)" in bench.markdown({"first_batch_s": 4.0})


def test_the_step_breakdown_parts_add_up_to_the_profiled_step(compose_cfg) -> None:
    from hydra.utils import instantiate

    cfg = compose_cfg("train", FAST)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = [batch for _, batch in zip(range(3), datamodule.train_dataloader(), strict=False)]
    parts = bench.step_breakdown(cfg, batches, warmup=1)
    assert set(parts) == {"fp32+NHWC", "bf16+NHWC"}
    for shares in parts.values():
        assert list(shares) == [*bench.STEP_PARTS.values(), bench.OTHER_PART]
        assert shares["convolutions, forward"] > 0 and shares["convolutions, backward"] > 0
        assert all(value >= 0 for value in shares.values())
    table = bench.breakdown_markdown(parts)
    total = sum(parts["fp32+NHWC"].values()), sum(parts["bf16+NHWC"].values())
    assert f"| all | {total[0]:.1f} | {total[1]:.1f} | {total[0] / total[1]:.2f} |" in table


def test_channels_last_gives_the_same_outputs() -> None:
    import torch

    torch.manual_seed(0)
    net = UNet(base_width=4).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = net(images)
        net = net.to(memory_format=torch.channels_last)
        actual = net(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_predict_bench_times_whole_predict_calls(trained_checkpoints, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(predict_bench, "SHARED_DATA", tmp_path / "absent")  # phantoms even beside real data
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    folder = predict_bench.default_input(scratch)
    assert len(list(folder.glob("*.png"))) == 64
    variants = ["torch fp32", "torch bf16", "openvino bf16"]
    figures = predict_bench.run(folder, 2, [f"ckpt_path={trained_checkpoints[0]}"], scratch, variants)
    assert figures["images"] == 64
    per_second = figures["images_per_second"]
    assert list(per_second) == variants
    assert all(0 < v["min"] <= v["median"] <= v["max"] for v in per_second.values())
    reference = per_second["torch fp32"]["median"]
    assert figures["speedup"] == pytest.approx({name: v["median"] / reference for name, v in per_second.items()})
    assert len(list(scratch.glob("*/*.mask.png"))) == 6 * 64  # 2 rounds x 3 variants, every image written
    assert "| openvino bf16 |" in predict_bench.markdown(figures)
    for name, by_stage in figures["milliseconds_per_image"].items():
        assert list(by_stage)[:-1] == list(STAGES) and all(value >= 0 for value in by_stage.values()), name
        assert by_stage["networks"] > 0 and by_stage[WRITER_STAGE] > 0, name
        assert by_stage["other (files, model loading)"] > 0, name  # the writer's thread is not subtracted


@pytest.mark.parametrize(
    ("bench", "arguments", "message"),
    [
        (predict_bench, ["--rounds", "0"], "argument --rounds: '0' is not a whole number >= 1"),
        (predict_bench, ["--input", "/nonexistent/xrays"], "error: input '/nonexistent/xrays' names no image files"),
        (serve_bench, ["--requests", "1"], "argument --requests: '1' is not a whole number >= 2"),
        (serve_bench, ["--concurrency", "-3"], "argument --concurrency: '-3' is not a whole number >= 1"),
        (serve_bench, ["--warmup", "1.5"], "argument --warmup: '1.5' is not a whole number >= 0"),
        (serve_bench, ["--image", "/nonexistent.png"], "error: --image '/nonexistent.png': No such file or directory"),
    ],
)
def test_benchmarks_refuse_bad_arguments_before_any_work(
    bench, arguments: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert run_command(bench.main, *arguments) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_a_server_that_stops_at_start_is_its_own_last_line(capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    refusing = "import sys; sys.stderr.write('noise\\nerror: ckpt_path nope.ckpt does not exist\\n'); sys.exit(2)"
    server = subprocess.Popen([sys.executable, "-c", refusing], stderr=subprocess.PIPE, text=True)
    server.wait(timeout=30)
    with pytest.raises(SystemExit) as stopped:
        serve_bench.wait_until_up("http://127.0.0.1:9", server)
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2
    assert error == "error: the server stopped before answering (exit code 2): ckpt_path nope.ckpt does not exist"


def test_the_gpu_check_lists_its_runs_on_a_cpu_and_each_composes(monkeypatch, capsys) -> None:
    import sys

    from covidseg.benchmarks import gpu_check
    from covidseg.core.config import compose_config

    monkeypatch.setattr(sys, "argv", ["gpu_check", "--steps", "7"])
    gpu_check.main()  # no CUDA here: it lists what it would run and returns
    said = capsys.readouterr().out
    assert "no CUDA GPU here" in said and "experiment=best_gpu" in said and "trainer.limit_train_batches=7" in said
    for command in gpu_check.commands(7, gpus=4, run_dir=Path("/nowhere")).values():
        module, overrides = command[2].removeprefix("covidseg."), command[3:]
        cfg = compose_config(module, [o for o in overrides if not o.startswith("hydra.")], output_dir="/nowhere")
        assert cfg.trainer.accelerator == "gpu"
        if module == "train":
            assert cfg.model.net.base_width == 32 and cfg.model.input_size is None
            assert cfg.trainer.precision == "bf16-mixed"
        if "trainer=ddp" in overrides:
            assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4 and cfg.trainer.sync_batchnorm


def test_data_scaling_reports_index_and_cache_per_image(tmp_path: Path, capsys) -> None:
    from covidseg.benchmarks import data_scaling

    code = run_command(data_scaling.main, "--counts", "6", "12", "--size", "32", "--root", str(tmp_path / "root"),
                       "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 0
    (folder,) = (tmp_path / "out").iterdir()
    rows = json.loads((folder / "data_scaling.json").read_text())["rows"]
    assert [row["images"] for row in rows] == [6, 12]
    assert all(row["index_s"] > 0 and row["build_s"] > 0 and row["cache_mib"] > 0 for row in rows)
    assert "| 12 |" in (folder / "data_scaling.md").read_text()
    assert not any(path.name.startswith(".scaling-cache-") for path in (tmp_path / "root").iterdir())  # removed
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    rerun = run_command(data_scaling.main, "--counts", "6", "--root", root, "--out", out)
    assert rerun == 0 and len(list((tmp_path / "out").iterdir())) == 2  # phantoms found again, figures beside
