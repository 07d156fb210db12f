"""The data stage at scale, through the real launcher: stage 1 on 2 CPU ranks, one step.

    python bench/data_scale.py --model DIR [--records 200000] [--old REV]

Writes a synthetic corpus of `--records` chat records (words of the sample data, about 660
tokens each with the tiny tokenizer), then runs `deepspeed --num_gpus 2 launch/stage1.py
--max_steps 1` four times: on the sample data (the memory baseline), cold (empty data
cache), warm (the same inputs again: a resume), and with today's code replaced by git
revision `--old` (the path before the cache: every rank reads and tokenises everything).
For each run: seconds to the data summary line, to the first step (metrics.jsonl written),
and each rank's peak RSS and peak anonymous RSS (polled every 0.2 s; RSS also counts touched
pages of memory-mapped Arrow files, which are page cache); and whether rank 1 waited and loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "stage1.jsonl"


def write_corpus(path: Path, records: int, seed: int = 0) -> Path:
    """`records` three-exchange conversations of words from the sample data."""
    words = " ".join(json.loads(line)["conversations"][-1]["value"] for line in SAMPLE.read_text().splitlines()).split()
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(records):
            turns = []
            for _ in range(3):
                turns += [{"from": "human", "value": " ".join(rng.choices(words, k=36))},
                          {"from": "gpt", "value": " ".join(rng.choices(words, k=80))}]
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    return path


def run(repo: Path, model: str, data: Path, cache: Path, port: int, extra: list[str]) -> dict:
    """One launcher run to its first step; timings, per-rank peak RSS and the data lines."""
    with tempfile.TemporaryDirectory() as out:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(repo / "launch" / "stage1.py"),
               "--model", model, "--data", str(data), "--output_dir", out, "--max_steps", "1", "--log_every", "1",
               "--global_batch_size", "2", "--micro_batch_size", "1", *extra]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo),
               "PYTHONUNBUFFERED": "1", "HF_DATASETS_CACHE": str(cache)}
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, peaks, first_step = [], {}, None

        def read():
            for line in proc.stdout:
                lines.append((time.monotonic() - started, line.rstrip()))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        metrics = Path(out) / "metrics.jsonl"
        while proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    rank = next((a.split("=")[1] for a in child.cmdline() if a.startswith("--local_rank=")), None)
                    if rank is not None:
                        rss, anon = peaks.get(rank, (0, 0))
                        peaks[rank] = (max(rss, child.memory_info().rss), max(anon, anonymous_bytes(child.pid)))
                except psutil.Error:
                    pass
            if first_step is None and metrics.exists() and metrics.stat().st_size:
                first_step = time.monotonic() - started
            time.sleep(0.2)
        reader.join(5)
        if proc.returncode:
            raise SystemExit(f"run failed ({proc.returncode}):\n" + "\n".join(l for _, l in lines[-30:]))
    summary = next((t for t, l in lines if "data: " in l and " records (" in l), None)
    data_lines = [l.rsplit("\r", 1)[-1] for _, l in lines if "data: " in l]  # progress bars share the lines
    return {"to_data_s": summary, "to_first_step_s": first_step,
            "peak_rss_mb": {r: rss / 2**20 for r, (rss, _) in sorted(peaks.items())},
            "peak_anon_mb": {r: anon / 2**20 for r, (_, anon) in sorted(peaks.items())},
            "data_lines": data_lines}


def anonymous_bytes(pid: int) -> int:
    """RssAnon: the resident memory no file backs. RSS also counts the pages of memory-mapped
    Arrow files a process has touched, which the kernel reclaims under pressure."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def old_checkout(rev: str, into: Path) -> Path:
    archive = into / "old.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "old", filter="data")
    return into / "old"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--old", default="", help="git revision of the path before the cache (skipped when empty)")
    parser.add_argument("--port", type=int, default=29811)
    parser.add_argument("--max_length", default="1024")
    args = parser.parse_args()
    extra = ["--max_length", args.max_length]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        corpus = write_corpus(tmp / "corpus.jsonl", args.records)
        print(f"corpus: {args.records} records, {corpus.stat().st_size / 2**20:.0f} MB, written in {time.monotonic() - t0:.0f} s")
        runs = {
            "sample data": (REPO, SAMPLE, tmp / "cache-sample"),
            "cold": (REPO, corpus, tmp / "cache"),
            "warm": (REPO, corpus, tmp / "cache"),
        }
        if args.old:
            runs["old path"] = (old_checkout(args.old, tmp), corpus, tmp / "cache-old")
        for i, (name, (repo, data, cache)) in enumerate(runs.items()):
            result = run(repo, args.model, data, cache, args.port + i, extra)
            rss = ", ".join(f"rank {r} {v:.0f} MB (anonymous {result['peak_anon_mb'][r]:.0f} MB)"
                            for r, v in result["peak_rss_mb"].items())
            print(f"{name}: data summary at {result['to_data_s']:.1f} s, first step at {result['to_first_step_s']:.1f} s; "
                  f"peak RSS {rss}")
            for line in result["data_lines"]:
                print(f"    {line}")


if __name__ == "__main__":
    main()
