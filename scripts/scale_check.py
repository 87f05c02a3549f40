"""Captioning at scale, measured: one process against `caption.py --engine ray` with 1 and 2 actors on the same
photos, their captions compared, and a Ray job killed part-way and resumed.

    python scripts/scale_check.py --data ../shared/data/flickr8k --split val --limit 1000

Each run is a fresh `caption.py` process, timed from start to exit (model loading and Ray's start included), so the
figures are what a user waits for. Run it on an otherwise idle machine.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import load_split
from scale import ROOT, finished_rows, read_shard


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--model", default=str(ROOT / "captioner.pt"))
    parser.add_argument("--batch-size", type=int, default=16)
    arguments = parser.parse_args()
    photos = [str(item.image) for item in load_split(arguments.data, arguments.split)[: arguments.limit]]
    caption = [sys.executable, str(ROOT / "caption.py"), "--model", arguments.model, "--batch-size",
               str(arguments.batch_size)]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="scale-check-"))
    single = work / "single.jsonl"
    seconds = {"one process": timed([*caption, *photos, "--format", "jsonl", "--output", str(single)])}
    expected = {row["image"]: row for row in map(json.loads, single.read_text().splitlines())}
    same = {"one process": len(expected)}
    for actors in (1, 2):
        output = work / f"ray-{actors}"
        name = f"Ray Data, {actors} actor{'s' * (actors > 1)}"
        seconds[name] = timed([*caption, "--engine", "ray", *photos, "--output", str(output), "--actors", str(actors)])
        same[name] = sum(row == expected.get(image) for image, row in finished_rows(output).items())
    print(f"{len(photos)} photos, {os.cpu_count()} CPUs, batches of {arguments.batch_size}, start to exit")
    print("| engine | seconds | photos/s | against one process | captions equal to one process's |")
    print("|---|---|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.0f} | {len(photos) / value:.1f} | {seconds['one process'] / value:.2f}x | "
              f"{same[name]}/{len(photos)} |")  # fmt: skip

    killed = work / "killed"
    command = [*caption, "--engine", "ray", *photos, "--output", str(killed), "--shard-rows", "50"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list(killed.glob("part-*"))) < 3 and job.poll() is None:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    before = sum(len(read_shard(shard)) for shard in killed.glob("part-*"))
    resumed = timed(command)
    images = [row["image"] for shard in killed.glob("part-*") for row in read_shard(shard)]
    print(
        f"\nkilled after {before} photos, run again: {len(images)} rows for {len(set(images))} distinct photos of "
        f"{len(photos)} ({resumed:.0f} s), captions equal to one process's: "
        f"{sum(row == expected.get(image) for image, row in finished_rows(killed).items())}/{len(photos)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
