"""What does content identity cost a build?

Every build fingerprints its three inputs (once per file version: the digest is cached beside the
checkpoint, keyed by size, mtime and inode) and its own output (while its bytes are still in the
page cache). This measures, on generated Qwen2-shaped checkpoints of --size-gb each:

  build, first      `micota-merge build` with no fingerprint cached anywhere (the worst case)
  build, again      the same build again: the inputs' digests come from their caches
  fingerprint only  checkpoint_fingerprint() of the 3 inputs + the output, caches removed
  read floor        `cat` of the same 4 files to /dev/null: the bytes at page-cache speed

and prints fingerprint / (first build - fingerprint): the share it adds to a build (target <= 10 %).

    python bench/fingerprint.py --size-gb 1.0 [--workdir /tmp/micota-bench-fp]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from merge_throughput import family_recipe  # noqa: E402


def clear_caches(work: Path) -> None:
    from micota_merge.core.fingerprint import cache_file

    for p in work.rglob("config.json"):
        cache_file(p.parent).unlink(missing_ok=True)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each generated checkpoint (bf16)")
    ap.add_argument("--workdir", default="/tmp/micota-bench-fp")
    args = ap.parse_args()

    from micota_merge.core.fingerprint import checkpoint_fingerprint

    work, model_bytes, recipe = family_recipe(args.workdir, args.size_gb)
    micota = str(Path(sys.executable).parent / "micota-merge")
    build = [micota, "build", str(recipe), "--force"]

    timed(build)  # warm imports and the page cache
    clear_caches(work)
    first = timed(build)
    again = timed(build)
    clear_caches(work)
    folders = [work / r for r in ("base", "long_cot", "short_cot", "ta")]
    t0 = time.perf_counter()
    for f in folders:
        checkpoint_fingerprint(f)
    fp = time.perf_counter() - t0
    files = [str(p) for f in folders for p in sorted(f.glob("*.safetensors"))]
    cat = timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
    gib = sum(Path(p).stat().st_size for p in files) / 2**30

    print(f"checkpoints of {model_bytes / 2**30:.2f} GiB; fingerprinted {gib:.2f} GiB (3 inputs + output)")
    print(f"{'build, first (nothing cached)':34}{first:8.1f} s")
    print(f"{'build, again (inputs cached)':34}{again:8.1f} s")
    print(f"{'fingerprint only (4 checkpoints)':34}{fp:8.1f} s  ({gib / fp:.1f} GiB/s)")
    print(f"{'read floor (cat, page cache)':34}{cat:8.1f} s  ({gib / cat:.1f} GiB/s)")
    print(
        f"fingerprinting adds {100 * fp / (first - fp):.1f} % to a first build "
        f"(and about {100 * checkpoint_share(work) / (again):.1f} % once the inputs are cached)"
    )
    shutil.rmtree(work, ignore_errors=True)


def checkpoint_share(work: Path) -> float:
    """Seconds to fingerprint the output alone, the part a build with cached inputs still pays."""
    from micota_merge.core.fingerprint import cache_file, checkpoint_fingerprint

    cache_file(work / "ta").unlink(missing_ok=True)
    t0 = time.perf_counter()
    checkpoint_fingerprint(work / "ta")
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
