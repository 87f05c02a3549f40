"""Load test: N concurrent gradio_client clients against the real app on loopback, a fixed number of requests.

    python scripts/load_app.py --clients 8 --requests 25          # the shipped model
    python scripts/load_app.py --model other.pt --clients 2 --requests 3

Prints throughput, p50/p95 latency, failures and the server's resident memory after warm-up and at the end.
Exits 1 on any failed request or memory growth beyond --max-growth-mib. Every request goes to 127.0.0.1 only.
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from server import ROOT, start_app, stop_app


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def run(model: Path, clients: int, requests: int, image: Path) -> dict:
    from gradio_client import Client, handle_file

    url, process = start_app(model)
    try:
        warm = Client(url, verbose=False)
        for _ in range(3):  # warm-up: allocator pools, first-call costs
            warm.predict(handle_file(str(image)), api_name="/caption")
        memory_before = resident_mib(process.pid)
        latencies, failures = [], []
        lock = threading.Lock()

        def client_loop():
            client = Client(url, verbose=False)
            for _ in range(requests):
                started = time.perf_counter()
                try:
                    text = client.predict(handle_file(str(image)), api_name="/caption")[0]
                    ok = isinstance(text, str) and bool(text.strip())
                except Exception as error:  # any failure is counted and reported, not raised
                    ok, text = False, repr(error)
                with lock:
                    (latencies if ok else failures).append(time.perf_counter() - started if ok else text)

        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        memory_after = resident_mib(process.pid)
    finally:
        stop_app(process)
    latencies.sort()
    return {
        "requests": clients * requests,
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "throughput": len(latencies) / elapsed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)] if latencies else float("nan"),
        "memory_before": memory_before,
        "memory_after": memory_after,
        "seconds": elapsed,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "captioner.pt")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "cat.jpg")
    parser.add_argument("--max-growth-mib", type=float, default=150.0)
    arguments = parser.parse_args(argv)
    result = run(arguments.model, arguments.clients, arguments.requests, arguments.image)
    growth = result["memory_after"] - result["memory_before"]
    print(
        f"{arguments.clients} clients x {arguments.requests} requests: {result['requests'] - result['failures']} ok, "
        f"{result['failures']} failed in {result['seconds']:.1f} s; {result['throughput']:.2f} captions/s; "
        f"latency p50 {result['p50']:.2f} s, p95 {result['p95']:.2f} s; "
        f"server memory {result['memory_before']:.0f} MiB after warm-up, {result['memory_after']:.0f} MiB at the end "
        f"({growth:+.0f} MiB)"
    )
    if result["failures"]:
        print(f"first failure: {result['first_failure']}")
    return 1 if result["failures"] or growth > arguments.max_growth_mib else 0


if __name__ == "__main__":
    sys.exit(main())
