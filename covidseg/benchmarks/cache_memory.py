"""Memory of the decode cache when several processes of a machine train on it (DDP ranks).

python -m covidseg.benchmarks.cache_memory [--processes 2] [--out DIR] [data overrides]

Each of ``--processes`` processes (started like DDP's ranks, side by side) builds the datamodule's
Train and Val datasets from the decode cache (building it first if it is missing), reads every Train
sample once as training does, waits for the others, and reports its peak resident memory (VmHWM), its
resident anonymous and file-backed memory (RssAnon, RssFile) and its proportional share (Pss: shared
pages divided among the processes that map them). Two ways, interleaved: the arrays as covidseg maps
them (``mapped``: read-only, one copy in the page cache for every process) and copied into each
process (``copied``: what loading without a map did before). The real data when ../shared/covid-qu-ex
is there, else phantoms. It asserts nothing: the figures are read off the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from pathlib import Path

import numpy as np
from hydra.utils import instantiate

from covidseg.benchmarks.throughput import SHARED_DATA
from covidseg.core.config import compose_config
from covidseg.core.errors import user_errors, whole_number
from covidseg.core.writing import new_figures_folder, write_atomic

WAYS = ("mapped", "copied")


def memory_kib() -> dict[str, int]:
    """This process's VmHWM, RssAnon and RssFile (``/proc/self/status``) and Pss (``smaps_rollup``)."""
    figures = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            figures[key] = int(value.split()[0])
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            figures["Pss"] = int(line.split()[1])
    return figures


def one_process(overrides: list[str], way: str, barrier, results) -> None:
    cfg = compose_config("train", overrides, output_dir="/nonexistent")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    train, val = datamodule.dataset("Train", train=True), datamodule.dataset("Val")
    if way == "copied":
        for dataset in (train, val):
            dataset.images, dataset.masks = np.array(dataset.images), np.array(dataset.masks)
    for index in range(len(train)):  # every sample once, as an epoch reads them
        train[index]
    barrier.wait()  # all processes hold their data at once, as DDP's ranks do
    results.put(memory_kib() | {"images": len(train) + len(val)})
    barrier.wait()


def measure(overrides: list[str], way: str, processes: int) -> list[dict[str, int]]:
    context = multiprocessing.get_context("spawn")  # fresh processes, as torchrun starts ranks
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=one_process, args=(overrides, way, barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    figures = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covidseg.benchmarks.cache_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--processes", type=whole_number(1), default=2, help="processes side by side (DDP ranks)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_cache"), help="figures go to DIR/<date_time>")
    parser.add_argument("overrides", nargs="*", help="train overrides, e.g. data.targets=[lung,infection]")
    args = parser.parse_args()
    real = (SHARED_DATA / "Infection Segmentation Data").is_dir()
    data = [f"data.root={SHARED_DATA}"] if real else ["data=synthetic"]
    overrides = [*data, "data.classes=[COVID-19,Non-COVID,Normal]", *args.overrides]
    with user_errors():
        out = new_figures_folder(args.out)
        figures = {way: measure(overrides, way, args.processes) for way in WAYS}
    rows = [
        "| way | processes | images each | peak RSS (VmHWM), MiB | RssAnon | RssFile | Pss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for way, measured in figures.items():
        median = {
            key: statistics.median(row[key] for row in measured) / 1024
            for key in ("VmHWM", "RssAnon", "RssFile", "Pss")
        }
        mib = " | ".join(f"{median[key]:.0f}" for key in ("VmHWM", "RssAnon", "RssFile", "Pss"))
        rows.append(f"| {way} | {len(measured)} | {measured[0]['images']} | {mib} |")
    write_atomic(out / "cache_memory.json", json.dumps({"overrides": overrides, "figures": figures}, indent=2) + "\n")
    print("\n".join(rows) + "\n(medians over the processes)")
    print(f"written: {out / 'cache_memory.json'}")


if __name__ == "__main__":
    main()
