"""CPU throughput benchmark: covidseg's Lightning loop vs a bare PyTorch loop vs the machine's GEMM rate,
and fp32 / NHWC / bf16 training and inference (plus ONNX Runtime) side by side in interleaved rounds.

python -m covidseg.benchmarks.throughput [--steps N] [--rounds R] [--out DIR] [overrides, e.g. experiment=fast_cpu]

Runs on the real data when ../shared/covid-qu-ex (or data.root) is there, else on synthetic data.
Writes bench.json and bench.md; prints the table. It asserts nothing: targets are read off the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from covidseg.core.config import compose_config
from covidseg.core.errors import ConfigError, DataError, user_errors, whole_number
from covidseg.core.writing import new_figures_folder, write_atomic
from covidseg.data.index import find_split_root
from covidseg.inference.model_spec import InferenceSettings
from covidseg.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "covid-qu-ex"


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 GEMM rate: the yardstick for model efficiency."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def count_gflops(module: torch.nn.Module, loss: torch.nn.Module, batch: dict, train: bool) -> float:
    """FLOPs per image of one forward (and backward when ``train``), counted by PyTorch."""
    images, masks = batch["image"][:1], batch["mask"][:1]
    with FlopCounterMode(display=False) as counter:
        if train:
            loss(module(images), masks).backward()
        else:
            with torch.no_grad():
                module(images)
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def images_per_second(batch_size: int, step_seconds: list[float]) -> float:
    """From the median step: robust to the odd slow step on a shared machine."""
    return batch_size / float(np.median(step_seconds))


class StepTimer(L.Callback):
    """Times each training step from one batch start to the next (data loading included),
    after ``warmup`` steps, and the wait for the first batch."""

    def __init__(self, warmup: int, start: float) -> None:
        self.warmup = warmup
        self.start = start
        self.first_batch_s: float | None = None
        self.last_start: float | None = None
        self.step_seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.first_batch_s is None:
            self.first_batch_s = now - self.start
        if trainer.global_step > self.warmup:
            self.step_seconds.append(now - self.last_start)
        self.last_start = now

    def on_train_end(self, trainer, pl_module) -> None:
        self.step_seconds.append(time.perf_counter() - self.last_start)


def lightning_train(cfg: DictConfig, steps: int, warmup: int) -> dict[str, float]:
    """covidseg's own Lightning loop and datamodule, with validation, logging and checkpoints off."""
    start = time.perf_counter()
    timer = StepTimer(warmup, start)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer,
        max_epochs=None,
        max_steps=warmup + steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return {
        "train_img_s": images_per_second(cfg.data.batch_size, timer.step_seconds),
        "first_batch_s": timer.first_batch_s,
    }


class Batches:
    """Collected batches as one iterable (a list would be taken for a list of dataloaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loop_steps(cfg: DictConfig, batches: list[dict], warmup: int) -> float:
    """Images per second of covidseg's LightningModule in Lightning's loop over ``batches`` (no
    validation, logger, checkpoints, progress bar or callbacks: the loop itself)."""
    timer = StepTimer(warmup, time.perf_counter())
    trainer = instantiate(
        cfg.trainer, max_epochs=None, max_steps=len(batches), limit_val_batches=0, logger=False, callbacks=[timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(instantiate(cfg.model), train_dataloaders=Batches(batches))
    return images_per_second(cfg.data.batch_size, timer.step_seconds)


def _bare_loop(module: torch.nn.Module, batches: list[dict], bf16: bool) -> Iterator[int]:
    """The hand-written loop over ``batches``: the module's own ``training_step`` (loss, presence
    loss, metric updates) under bf16 autocast where ``bf16``, backward, optimizer step (no scheduler:
    it needs a Trainer); yields each step's index once the step is done."""
    optimizer = module.optimizer_factory(params=module.parameters())
    module.train()
    with warnings.catch_warnings():  # self.log without a Trainer says so, and does nothing
        warnings.simplefilter("ignore")
        for index, batch in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = module.training_step(batch, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield index


def _bare_steps(cfg: DictConfig, batches: list[dict], warmup: int) -> float:
    """The same work as Lightning's loop in :func:`_bare_loop`, with the autocast Lightning's precision uses."""
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    step_seconds = []
    started = time.perf_counter()
    for index in _bare_loop(instantiate(cfg.model), batches, bf16):
        now = time.perf_counter()
        if index >= warmup:
            step_seconds.append(now - started)
        started = now
    return images_per_second(cfg.data.batch_size, step_seconds)


def framework_overhead(cfg: DictConfig, datamodule, steps: int, warmup: int, rounds: int) -> dict[str, dict]:
    """Lightning's loop against the bare loop over the same batches, in interleaved rounds (loop,
    bare, loop, bare ...): each one's images per second and the ratio of each round."""
    batches = [batch for _, batch in zip(range(warmup + steps), datamodule.train_dataloader(), strict=False)]
    loop, bare = [], []
    for _ in range(rounds):
        torch.manual_seed(cfg.seed)
        loop.append(_loop_steps(cfg, batches, warmup))
        torch.manual_seed(cfg.seed)
        bare.append(_bare_steps(cfg, batches, warmup))
    return {"loop": spread(loop), "bare": spread(bare),
            "ratio": spread([a / b for a, b in zip(loop, bare, strict=True)])}  # fmt: skip


def predictor_of(module: torch.nn.Module, bf16: bool = False) -> Predictor:
    """The prediction path of eval and predict, over a training module's network."""
    settings = InferenceSettings(threshold=module.hparams.threshold)
    return Predictor([module.network], module.targets, settings, bf16=bf16)


def inference(module: torch.nn.Module, batches: list[dict], bf16: bool = False) -> float:
    """Images per second of the Predictor, after one warm-up batch."""
    predictor = predictor_of(module, bf16)
    predictor.predict(batches[0]["image"])
    started = time.perf_counter()
    for batch in batches:
        predictor.predict(batch["image"])
    return sum(len(b["image"]) for b in batches) / (time.perf_counter() - started)


# Precision and memory-format variants compared side by side: name -> (bf16, channels_last, compile).
VARIANTS = {"fp32": (False, False, False), "fp32+NHWC": (False, True, False), "bf16+NHWC": (True, True, False)}
COMPILED = {"bf16+NHWC+compile": (True, True, True)}  # --compile: torch.compile's first step is timed apart


def _train_steps(module: torch.nn.Module, batches: list[dict], bf16: bool, first_step: list | None = None) -> float:
    """Images per second of bare training steps over ``batches`` (after one untimed step, whose
    seconds are appended to ``first_step``: compilation happens there)."""
    optimizer = module.optimizer_factory(params=module.parameters())
    module.train()

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.loss(module(batch["image"]), batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    step(batches[0])
    if first_step is not None:
        first_step.append(time.perf_counter() - started)
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return sum(len(b["image"]) for b in batches) / (time.perf_counter() - started)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def compare_variants(cfg: DictConfig, datamodule, rounds: int, steps: int, compiled: bool = False) -> dict:
    """fp32, fp32 NHWC and bf16 NHWC training and inference (and with ``compiled`` bf16 NHWC under
    ``torch.compile``), and ONNX Runtime (fp32) inference, in interleaved rounds (A B C A B C ...):
    the median, min and max of each, and speed-ups against fp32."""
    import onnxruntime

    from covidseg.inference.exporters import trace_onnx

    train_batches = [batch for _, batch in zip(range(steps), datamodule.train_dataloader(), strict=False)]
    eval_batches = [batch for _, batch in zip(range(max(2, steps)), datamodule.val_dataloader(), strict=False)]
    variants = VARIANTS | (COMPILED if compiled else {})
    modules = {}
    for name, (_, channels_last, compile_network) in variants.items():
        torch.manual_seed(cfg.seed)
        modules[name] = instantiate(cfg.model, channels_last=channels_last, compile=compile_network)
    with tempfile.TemporaryDirectory() as folder:  # the session keeps the graph in memory
        predictor = predictor_of(modules["fp32"]).eval()
        names = ["probability"] + ["presence"] * predictor.has_presence
        onnx_path = trace_onnx(predictor, eval_batches[0]["image"][:1], Path(folder) / "m.onnx", names)
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    measured: dict[str, list[float]] = {}
    first_steps: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (bf16, _, _) in variants.items():
            speed = _train_steps(modules[name], train_batches, bf16, first_steps[name])
            measured.setdefault(f"train {name}", []).append(speed)
            measured.setdefault(f"infer {name}", []).append(inference(modules[name], eval_batches, bf16))
        session.run(None, {"image": eval_batches[0]["image"].numpy()})
        started = time.perf_counter()
        for batch in eval_batches:
            session.run(None, {"image": batch["image"].numpy()})
        images = sum(len(b["image"]) for b in eval_batches)
        measured.setdefault("infer onnxruntime fp32", []).append(images / (time.perf_counter() - started))
    figures = {name: spread(values) for name, values in measured.items()}
    for name, figure in figures.items():
        figure["speedup"] = figure["median"] / figures[f"{name.split()[0]} fp32"]["median"]
    for name in COMPILED if compiled else ():  # the first round's first step holds the compilation
        figures[f"train {name}"]["first_step_s"] = first_steps[name][0]
    return figures


# Where a training step's time goes: torch.profiler's self CPU time of each operator, grouped by
# the first of these name fragments it contains (the rest: element-wise work, copies, the loss's
# arithmetic and the optimizer).
STEP_PARTS = {
    "convolution_backward": "convolutions, backward",
    "convolution": "convolutions, forward",
    "batch_norm": "batch norm, forward + backward",
    "aten::sort": "sorting (the Lovász hinge)",
    "upsample": "upsampling, forward + backward",
    "pool": "pooling, forward + backward",
}
OTHER_PART = "the rest"


def _step_parts(cfg: DictConfig, batches: list[dict], warmup: int, bf16: bool) -> dict[str, float]:
    """Milliseconds per training step of :func:`_bare_loop` (NHWC) in each part of
    :data:`STEP_PARTS`, after ``warmup`` unprofiled steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    torch.manual_seed(cfg.seed)
    module = instantiate(cfg.model, channels_last=True)
    timed = batches[warmup:]
    steps = schedule(wait=0, warmup=warmup, active=len(timed), repeat=1)  # the warm-up steps are not counted
    with profile(activities=[ProfilerActivity.CPU], schedule=steps) as profiler:
        for _ in _bare_loop(module, batches, bf16):
            profiler.step()
    shares = dict.fromkeys([*STEP_PARTS.values(), OTHER_PART], 0.0)
    for event in profiler.key_averages():
        part = next((part for fragment, part in STEP_PARTS.items() if fragment in event.key), OTHER_PART)
        shares[part] += event.self_cpu_time_total / 1000 / len(timed)
    return shares


def breakdown_batches(cfg: DictConfig, count: int) -> list[dict]:
    """The first ``count`` training batches of ``cfg``'s data, or one line when there are fewer."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # phantoms are written first where there is no real data
    datamodule.setup("fit")
    batches = [batch for _, batch in zip(range(count), datamodule.train_dataloader(), strict=False)]
    if len(batches) < count:
        raise ConfigError(
            f"--warmup and --steps ask for {count} batches, but the training set gives {len(batches)} a pass: ask "
            "for fewer or a smaller data.batch_size"
        )
    return batches


def step_breakdown(cfg: DictConfig, batches: list[dict], warmup: int) -> dict[str, dict[str, float]]:
    """:func:`_step_parts` for fp32 + NHWC and bf16 + NHWC."""
    return {name: _step_parts(cfg, batches, warmup, bf16) for name, bf16 in (("fp32+NHWC", False), ("bf16+NHWC", True))}


def breakdown_markdown(parts: dict[str, dict[str, float]]) -> str:
    """The step's parts side by side: ms per step in fp32 + NHWC and bf16 + NHWC, and bf16's speed-up."""
    fp32, bf16 = parts["fp32+NHWC"], parts["bf16+NHWC"]
    lines = ["| part of a training step | fp32+NHWC (ms) | bf16+NHWC (ms) | × |", "|---|---:|---:|---:|"]
    for part in [*fp32, "all"]:
        a, b = (sum(p.values()) for p in (fp32, bf16)) if part == "all" else (fp32[part], bf16[part])
        lines.append(f"| {part} | {a:.1f} | {b:.1f} | {a / b:.2f} |" if b else f"| {part} | {a:.1f} | {b:.1f} | |")
    return "\n".join(lines) + "\n"


def variants_markdown(figures: dict) -> str:
    lines = ["| path | img/s (median) | min–max | × fp32 | first step |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {name} | {f['median']:.2f} | {f['min']:.2f}–{f['max']:.2f} | {f['speedup']:.2f} "
        f"| {f'{first:.1f} s' if (first := f.get('first_step_s')) is not None else ''} |"
        for name, f in figures.items()
    ]
    return "\n".join(lines) + "\n"


def data_throughput(datamodule, batches: int) -> float:
    """The datamodule alone: indexing the cache, augmentation and collation."""
    loader = (batch for _ in range(batches + 1) for batch in datamodule.train_dataloader())
    next(loader)
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(loader)["image"])
    return images / (time.perf_counter() - started)


def compose_bench_config(overrides: list[str]) -> DictConfig:
    """The train config with ``overrides``, on the real data when it is found, else on synthetic."""
    if not any(o.startswith(("data=", "data.root=")) for o in overrides):
        try:
            find_split_root(compose_config("train", overrides).data.root)
        except DataError:
            extra = [f"data.root={SHARED_DATA}"] if SHARED_DATA.is_dir() else ["data=synthetic", "data.image_size=256"]
            overrides = [*extra, *overrides]
    return compose_config("train", overrides, output_dir="unused")


def run(cfg: DictConfig, steps: int, warmup: int, rounds: int = 2, compiled: bool = False) -> dict:
    results: dict = {
        "model": cfg.model.net._target_.rsplit(".", 1)[-1],
        "data": str(cfg.data.root),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "channels_last": cfg.model.get("channels_last", False),
        "precision": str(cfg.trainer.precision),
        "matmul_gflops": matmul_gflops(),
    }
    L.seed_everything(cfg.seed)
    results |= lightning_train(cfg, steps, warmup)
    results["train_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    results["data_img_s"] = data_throughput(datamodule, batches=20)
    overhead = framework_overhead(cfg, datamodule, steps, warmup, max(rounds, 3))
    results["train_loop_img_s"] = overhead["loop"]["median"]
    results["train_bare_img_s"] = overhead["bare"]["median"]
    results["framework_overhead_ratio"] = overhead["ratio"]["median"]
    results["framework_overhead_ratio_min"] = overhead["ratio"]["min"]
    results["framework_overhead_ratio_max"] = overhead["ratio"]["max"]

    module = instantiate(cfg.model)
    sample = next(iter(datamodule.train_dataloader()))
    results["params_m"] = sum(p.numel() for p in module.parameters()) / 1e6
    train_gflop = count_gflops(module, module.loss, sample, train=True)
    infer_gflop = count_gflops(module, module.loss, sample, train=False)
    results["train_gflop_per_img"] = train_gflop
    results["infer_gflop_per_img"] = infer_gflop
    eval_batches = list(iter(datamodule.val_dataloader()))[: max(2, 48 // datamodule.eval_batch_size)]
    results["infer_img_s"] = inference(module, eval_batches, bf16=str(cfg.trainer.precision).startswith("bf16"))

    results["train_gflops"] = results["train_img_s"] * train_gflop
    results["train_efficiency"] = results["train_gflops"] / results["matmul_gflops"]
    results["infer_gflops"] = results["infer_img_s"] * infer_gflop
    results["infer_efficiency"] = results["infer_gflops"] / results["matmul_gflops"]
    results["data_to_train_ratio"] = results["data_img_s"] / results["train_img_s"]
    results["variants"] = compare_variants(cfg, datamodule, rounds, steps, compiled)
    return results


TARGETS = {
    "framework_overhead_ratio": (">=", 0.98),
    "train_efficiency": (">=", 0.70),
    "infer_efficiency": (">=", 0.85),
    "data_to_train_ratio": (">=", 20),
    "train_peak_rss_mb": ("<=", 3000),
    "first_batch_s": ("<=", 5),
}


def markdown(results: dict) -> str:
    lines = ["| figure | value | target |", "|---|---:|---|"]
    for name, value in results.items():
        if name == "variants":
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        target = ""
        if name in TARGETS:
            op, bound = TARGETS[name]
            met = value >= bound if op == ">=" else value <= bound
            target = f"{op} {bound} ({'met' if met else 'not met'})"
        lines.append(f"| {name} | {shown} | {target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covidseg.benchmarks.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=whole_number(1), default=6, help="timed training steps per loop")
    parser.add_argument("--warmup", type=whole_number(0), default=2, help="untimed training steps first")
    parser.add_argument(
        "--rounds", type=whole_number(1), default=2, help="interleaved rounds of the precision variants"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="figures go to DIR/<date_time>")
    parser.add_argument("--compile", action="store_true", help="add bf16+NHWC under torch.compile (slow first step)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="only where a training step's time goes, fp32+NHWC against bf16+NHWC (--rounds, --compile unused)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    args = parser.parse_args()
    with user_errors():
        cfg = compose_bench_config(args.overrides)
        if args.breakdown:
            batches = breakdown_batches(cfg, args.warmup + args.steps)
        out = new_figures_folder(args.out)
    if args.breakdown:
        parts = step_breakdown(cfg, batches, args.warmup)
        write_atomic(out / "breakdown.json", json.dumps(parts, indent=2) + "\n")
        print(breakdown_markdown(parts))
        print(f"written: {out / 'breakdown.json'}")
        return
    results = run(cfg, args.steps, args.warmup, args.rounds, args.compile)
    write_atomic(out / "bench.json", json.dumps(results, indent=2) + "\n")
    table = markdown(results) + "\n" + variants_markdown(results["variants"])
    write_atomic(out / "bench.md", table)
    print(table)
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")


if __name__ == "__main__":
    main()
