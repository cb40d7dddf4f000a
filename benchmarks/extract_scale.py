"""Feature files at scale: joining 1M×4096 float16 rows with bounded memory, and 1% updates.

Two measurements, each in a fresh process so its peak RSS is its own:

* ``merge``: synthetic shards (``--rows`` × ``--dim`` ``float16``, ``--shard-rows`` per shard, as
  a run publishes them) are joined into one output by the library's own planning and merge;
  then an update takes 1% of the rows from new shards and the rest from that output.  Prints the
  time, the size, and the peak RSS beyond the process's RSS before the merge.
* ``update``: a real ``vggfeat.extract`` run over ``--images`` JPEGs, then a rerun after 1% of
  them were replaced: the rerun's time against the full run's.
* ``store``: the same synthetic rows in a feature store (a folder of shards): publishing a full
  build, three 1% updates (each of another 1% of the rows: bytes written, time), a compaction,
  a sequential read of every row, a random read of 10k rows; each step in a fresh process,
  with its peak RSS; then each update's publishing time against the build's.

    python benchmarks/extract_scale.py merge --rows 1000000 --dim 4096 --dir /tmp/vggfeat-scale
    python benchmarks/extract_scale.py update --images 400
    python benchmarks/extract_scale.py store --rows 1000000 --dim 4096
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_paths(n: int) -> list[str]:
    return [f"/data/images/{i // 1000:04d}/{i:08d}.jpg" for i in range(n)]


def write_shards(parts: Path, paths: list[str], dim: int, shard_rows: int, seed: int,
                 labelled: bool = False) -> None:
    from vggfeat.cache.store import FileIds, write_shard

    rng = np.random.default_rng(seed)
    block = rng.standard_normal((shard_rows, dim)).astype(np.float16)
    parts.mkdir(parents=True, exist_ok=True)
    for lo in range(0, len(paths), shard_rows):
        chunk = paths[lo:lo + shard_rows]
        n = len(chunk)
        write_shard(parts, f"shard-r000-{lo:010d}-{seed:08x}.h5", paths=chunk, ids=FileIds.empty(n),
                    features=block[:n] + np.float16(lo % 7),
                    input_sizes=np.full((n, 1, 2), 224, np.int32), failed_paths=[],
                    failed_reasons=[], failed_ids=FileIds.empty(0), dtype="float16",
                    label_names=[""] * n if labelled else None)


def join(paths: list[str], sources: list, output: Path, dim: int) -> tuple[float, float, float]:
    """Plan and write ``output`` as a run's last step does; (seconds, RSS before, peak RSS)."""
    from vggfeat.cache.update import plan_update
    from vggfeat.cache.store import write_features

    before = rss_mib()
    start = time.perf_counter()
    plan = plan_update(paths, sources)
    rows, rows_at, failed_paths, reasons, failed_ids = plan.output()
    write_features(output, rows, paths=[paths[i] for i in rows_at], ids=plan.ids.take(rows_at),
                   labels=None, class_names=None, failed_paths=failed_paths,
                   failed_reasons=reasons, failed_ids=failed_ids, attrs={"dtype": "float16"},
                   dim=dim, n_scales=1, dtype="float16")
    return time.perf_counter() - start, before, peak_rss_mib()


def merge_child(args) -> None:
    from vggfeat.cache.store import list_shards, read_index

    folder = Path(args.dir)
    paths = synthetic_paths(args.rows)
    output, parts = folder / "features.h5", folder / "features.h5.parts"
    if args.step == "full":
        start = time.perf_counter()
        sources = [read_index(s) for s in reversed(list_shards(parts))]
        indexed = time.perf_counter() - start
        seconds, before, peak = join(paths, sources, output, args.dim)
        shutil.rmtree(parts)
        print(f"full merge: {args.rows} rows × {args.dim} float16 from {len(sources)} shards → "
              f"{output.stat().st_size / 2**30:.2f} GiB in {seconds + indexed:.1f} s "
              f"(reading shard indexes {indexed:.1f} s); RSS before {before:.0f} MiB, peak "
              f"{peak:.0f} MiB, +{peak - before:.0f} MiB")
    else:
        changed = paths[::100]  # 1%
        write_shards(parts, changed, args.dim, args.shard_rows, seed=2)
        start = time.perf_counter()
        sources = [read_index(s) for s in reversed(list_shards(parts))] + [read_index(output)]
        indexed = time.perf_counter() - start
        seconds, before, peak = join(paths, sources, output, args.dim)
        shutil.rmtree(parts)
        print(f"1% update merge: {len(changed)} new rows + {args.rows - len(changed)} reused → "
              f"{seconds + indexed:.1f} s (indexes {indexed:.1f} s); RSS before {before:.0f} MiB,"
              f" peak {peak:.0f} MiB, +{peak - before:.0f} MiB")


def empty_folder(args) -> Path:
    """``--dir``, emptied, once its disk is known to hold ~2.2× the float16 rows."""
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    needed = 2.2 * args.rows * args.dim * 2
    free = shutil.disk_usage(folder.parent).free
    if free < needed:
        sys.exit(f"{folder.parent} has {free / 2**30:.1f} GiB free; this needs about "
                 f"{needed / 2**30:.1f} GiB (use --rows or --dir)")
    return folder


def merge(args) -> None:
    folder = empty_folder(args)
    start = time.perf_counter()
    write_shards(folder / "features.h5.parts", synthetic_paths(args.rows), args.dim,
                 args.shard_rows, seed=1)
    print(f"wrote {args.rows} synthetic rows in shards of {args.shard_rows} in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    try:
        for step in ("full", "update"):
            subprocess.run([sys.executable, __file__, "merge-child", step, "--rows", str(args.rows),
                            "--dim", str(args.dim), "--shard-rows", str(args.shard_rows), "--dir",
                            str(folder)], check=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def publish(store: Path, paths: list[str], dim: int) -> None:
    """What ``vggfeat extract -o STORE`` does once its shards are computed: plan over the live
    and the newly published shards (the inputs statted while the index is read, as extract
    does), then write the index entry."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from vggfeat.cache.sharded import (
        compact,
        locate_inputs,
        needs_compaction,
        plan_changes,
        planning_sources,
        publish_update,
        read_state,
        unlisted_shards,
    )
    from vggfeat.cache.store import stat_files
    from vggfeat.cache.update import plan_update

    with ThreadPoolExecutor(1) as pool:
        stat = pool.submit(stat_files, paths)
        state = read_state(store)
        sources = planning_sources(state, unlisted_shards(store, state))
        plan = plan_update(paths, sources, now=stat.result(),
                           located=locate_inputs(paths, state, sources))
    images = SimpleNamespace(paths=paths, labels=None, class_names=None, skipped=[])
    changes = plan_changes(plan, state, images)
    entry = publish_update(store, state, plan, changes, images, dim=dim, n_scales=1,
                           dtype="float16")
    if needs_compaction(state, entry):  # as extract does: packs a build's small shards
        start = time.perf_counter()
        done = compact(store)
        print(f"  (packed {done.rewritten} small shards into {done.new_shards} in "
              f"{time.perf_counter() - start:.1f} s)", flush=True)


def store_child(args) -> None:
    from vggfeat.cache.sharded import compact, iter_features

    store, paths = Path(args.dir) / "store", synthetic_paths(args.rows)
    os.sync()  # the disk done with the last step's writes: each step pays only its own
    before, start = rss_mib(), time.perf_counter()
    size_before = folder_bytes(store)
    if args.step == "build":
        publish(store, paths, args.dim)
        what = f"full build published ({args.rows} rows)"
        (Path(args.dir) / "build.txt").write_text(str(time.perf_counter() - start))
    elif args.step.startswith("update"):
        k = int(args.step[len("update"):])
        changed = paths[k::100]
        write_shards(store / "shards", changed, args.dim, args.shard_rows, seed=2 + k,
                     labelled=True)
        computed = time.perf_counter() - start
        publish(store, paths, args.dim)
        published = time.perf_counter() - start - computed
        written = folder_bytes(store) - size_before
        what = (f"1% update ({len(changed)} rows): {written / 2**20:.1f} MiB written = "
                f"{100 * written / size_before:.2f}% of the store ({size_before / 2**30:.2f} GiB);"
                f" shards {computed:.1f} s + publishing {published:.2f} s")
        with open(Path(args.dir) / "updates.txt", "a") as f:
            f.write(f"{published}\n")
    elif args.step == "compact":
        done = compact(store, threshold=0.005)
        what = (f"compaction of {done.rewritten} shards into {done.new_shards}: "
                f"{done.bytes_before / 2**30:.2f} → {done.bytes_after / 2**30:.2f} GiB")
    elif args.step == "read":
        total = sum(block.nbytes for block, _ in iter_features(store, rows=16384))
        seconds = time.perf_counter() - start
        what = f"sequential read {total / 2**30:.2f} GiB at {total / 2**30 / seconds:.2f} GiB/s"
    else:
        import vggfeat

        bunch = vggfeat.load_features(store, lazy=True)
        opened = time.perf_counter() - start
        rows = np.random.default_rng(0).choice(len(bunch.data), min(10_000, len(bunch.data)),
                                                 replace=False)
        t = time.perf_counter()
        got = bunch.data[rows]
        bunch.data.close()
        what = (f"random read of {len(got)} rows: {time.perf_counter() - t:.1f} s "
                f"(opening the store {opened:.1f} s)")
    seconds = time.perf_counter() - start
    print(f"{what}: {seconds:.1f} s; RSS before {before:.0f} MiB, peak {peak_rss_mib():.0f} MiB",
          flush=True)


def store_bench(args) -> None:
    from vggfeat.cache.sharded import write_settings

    folder = empty_folder(args)
    store = folder / "store"
    store.mkdir(parents=True)
    write_settings(store, {"dtype": "float16", "scales": [224], "layer": "fc7"})
    start = time.perf_counter()
    write_shards(store / "shards", synthetic_paths(args.rows), args.dim, args.shard_rows, seed=1,
                 labelled=True)
    print(f"wrote {args.rows} synthetic rows in shards of {args.shard_rows} (what a run "
          f"publishes) in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        for step in ("build", "update0", "update1", "update2", "read", "random", "compact",
                     "read"):
            subprocess.run([sys.executable, __file__, "store-child", step, "--rows",
                            str(args.rows), "--dim", str(args.dim), "--shard-rows",
                            str(args.shard_rows), "--dir", str(folder)], check=True)
        entries = list((store / "index").iterdir())
        print(f"index: {len(entries)} entries, {sum(p.stat().st_size for p in entries)} bytes; "
              f"{len(list((store / 'shards').iterdir()))} shard files")
        build = float((folder / "build.txt").read_text())
        updates = [float(t) for t in (folder / "updates.txt").read_text().split()]
        print("1% updates' publishing against the build's: " + ", ".join(
            f"{t:.2f} s ({100 * t / build:.1f}%)" for t in updates) + f" of {build:.1f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def update(args) -> None:
    import torch
    from PIL import Image

    import vggfeat
    from vggfeat.descriptors import DescriptorSpec, extract

    model = vggfeat.vgg(args.arch, weights="random", width_mult=args.width_mult)
    spec = DescriptorSpec(scales=(args.scale,))
    rng = np.random.default_rng(0)
    print(f"# VGG {args.arch} ×{args.width_mult}, Q={args.scale}, {args.images} JPEGs "
          f"{args.size}², torch {torch.__version__}, {torch.get_num_threads()} threads")

    def jpeg(path: Path) -> None:
        small = rng.integers(0, 255, (args.size // 16, args.size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((args.size, args.size), Image.BICUBIC).save(path)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):
            jpeg(folder / f"{i:06d}.jpg")
        out = Path(tmp) / "f.h5"
        run = dict(spec=spec, model=model, workers=args.workers, progress=False)
        start = time.perf_counter()
        full = extract([folder], out, **run)
        t_full = time.perf_counter() - start
        for i in range(0, args.images, 100):  # 1% replaced
            jpeg(folder / f"{i:06d}.jpg")
        start = time.perf_counter()
        upd = extract([folder], out, **run)
        t_update = time.perf_counter() - start
        start = time.perf_counter()
        extract([folder], out, **run)
        t_nothing = time.perf_counter() - start
    print(f"full run:   {full.computed} computed in {t_full:.1f} s")
    print(f"1% update:  {upd.computed} computed, {upd.reused} reused in {t_update:.2f} s "
          f"= {100 * t_update / t_full:.1f}% of the full run")
    print(f"up to date: {t_nothing:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge")
    c = sub.add_parser("merge-child")
    c.add_argument("step", choices=["full", "update"])
    st = sub.add_parser("store")
    sc = sub.add_parser("store-child")
    sc.add_argument("step", choices=["build", "update0", "update1", "update2", "compact", "read",
                                     "random"])
    for p in (m, c, st, sc):
        p.add_argument("--rows", type=int, default=1_000_000)
        p.add_argument("--dim", type=int, default=4096)
        p.add_argument("--shard-rows", type=int, default=256)
        p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "vggfeat-scale"))
    u = sub.add_parser("update")
    u.add_argument("--images", type=int, default=400)
    u.add_argument("--arch", default="D")
    u.add_argument("--width-mult", type=float, default=0.25)
    u.add_argument("--scale", type=int, default=256)
    u.add_argument("--size", type=int, default=320)
    u.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if not args.command.endswith("-child"):
        print(f"# {platform.processor() or platform.machine()}, Python "
              f"{platform.python_version()}", flush=True)
    {"merge": merge, "merge-child": merge_child, "update": update, "store": store_bench,
     "store-child": store_child}[args.command](args)


if __name__ == "__main__":
    main()
