"""How indexing and the decode cache scale with the number of images: 1k, 10k, 100k phantoms.

python -m covidseg.benchmarks.data_scaling [--counts 1000 10000 100000] [--size 128] [--root DIR] [--out DIR]

For each count, phantoms in COVID-QU-Ex's layout (three classes, lung and infection masks, 256×256
PNGs) are written once under ``--root`` (default ``~/.cache/covidseg/scaling``, outside the
repository; a rerun finds them) and the Train split is then indexed (``index_split``: folders listed,
every image paired with its masks), its decode cache built into a new folder (``decode_samples``:
every PNG decoded and resized in threads, the arrays written whole) and mapped again as a second run
would. Each figure is printed per image, so a straight line reads as a constant; the peak resident
memory is the process's own (VmHWM) after each count. It asserts nothing: the figures are read off
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from covidseg.benchmarks.cache_memory import memory_kib
from covidseg.core.errors import user_errors, whole_number
from covidseg.core.labels import CLASSES
from covidseg.core.writing import new_figures_folder, write_atomic
from covidseg.data.decode import decode_samples
from covidseg.data.index import index_split
from covidseg.data.synthetic import SyntheticPhantoms

TARGETS = ("lung", "infection")


def one_count(count: int, size: int, root: Path) -> dict[str, float]:
    """Seconds to write (first time only), index, build and map ``count`` phantoms."""
    per_class = -(-count // len(CLASSES))  # rounded up: at least ``count`` images
    phantoms = SyntheticPhantoms({"Train": per_class}, image_size=256)
    folder = root / f"train-{per_class}x{len(CLASSES)}"
    started = time.perf_counter()
    phantoms.write(folder)  # returns at once when the folder already holds these phantoms
    written = time.perf_counter() - started
    started = time.perf_counter()
    samples = index_split(folder, "Train", CLASSES, TARGETS)
    indexed = time.perf_counter() - started
    cache = Path(tempfile.mkdtemp(prefix=".scaling-cache-", dir=root))
    try:
        started = time.perf_counter()
        decode_samples(samples, size, cache)
        built = time.perf_counter() - started
        started = time.perf_counter()
        images, masks = decode_samples(samples, size, cache)
        mapped = time.perf_counter() - started
        cache_bytes = sum(path.stat().st_size for path in cache.iterdir())
        del images, masks
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "images": len(samples),
        "write_s": written,
        "index_s": indexed,
        "build_s": built,
        "map_s": mapped,
        "cache_mib": cache_bytes / 2**20,
        "peak_rss_mib": memory_kib()["VmHWM"] / 1024,
    }


def markdown(rows: list[dict[str, float]], size: int) -> str:
    lines = [
        f"index and decode cache (lung + infection masks, cache at {size}×{size}), {os.cpu_count()} CPU(s)",
        "",
        "| images | index (s) | index (µs/img) | build (s) | build (ms/img) | map (s) | cache (MiB) | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        count = row["images"]
        lines.append(
            f"| {count} | {row['index_s']:.2f} | {1e6 * row['index_s'] / count:.1f} | {row['build_s']:.1f} | "
            f"{1e3 * row['build_s'] / count:.2f} | {row['map_s']:.3f} | {row['cache_mib']:.0f} | "
            f"{row['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m covidseg.benchmarks.data_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--counts", type=whole_number(3), nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--size", type=whole_number(16), default=128, help="the cache's image side")
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "covidseg" / "scaling")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_data"), help="figures go to DIR/<date_time>")
    args = parser.parse_args()
    with user_errors():
        args.root.mkdir(parents=True, exist_ok=True)
        rows = []
        for count in sorted(args.counts):
            rows.append(one_count(count, args.size, args.root))
            print(markdown(rows[-1:], args.size).splitlines()[-1], flush=True)
        out = new_figures_folder(args.out)
        table = markdown(rows, args.size)
        write_atomic(out / "data_scaling.json", json.dumps({"size": args.size, "rows": rows}, indent=2) + "\n")
        write_atomic(out / "data_scaling.md", table)
        print(table + f"written: {out}")


if __name__ == "__main__":
    main()
