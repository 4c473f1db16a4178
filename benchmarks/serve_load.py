"""Load test of ``lafn serve``: requests/s and p50/p95 latency under concurrent OpenAI clients, with a bank and
without, with transformers' continuous batching (CB) and without, for each number of clients in ``--clients``.

Each configuration starts its own server (``lafn serve``: an API server process and the model's process) on
127.0.0.1 (so the clients do not share their GIL), warms it up, then for each client count ``--requests``
completions are sent in all, half of them naming an edited subject and half not, always to the base model name
(every bank). It also checks that the edited answers are the same with and without CB. One run; prints a table
and the ratios.

    python benchmarks/serve_load.py [--model tiny-bilingual] [--bank DIR] [--clients 8,32] [--requests 200]
                                    [--max-tokens 8] [--threads 1] [--no-baseline]

Without ``--bank`` on the tiny model, a bank editing two of its facts (en + zh) is made first (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

from lafn_hf.models import TINY_MODEL

UNRELATED = ["The capital of France is", "My favourite colour is", "The weather today is", "我们明天去"]


def tiny_bank(directory: Path) -> tuple[Path, list[str], list[str]]:
    """Bank with facts 0 -> 1 and 2 -> 3 (en, zh); prompts naming them, prompts naming other facts."""
    from lafn_hf import EditableCausalLM, LafnConfig
    from lafn_hf.models import tiny_fact_group, tiny_facts, tiny_model_path

    data = tiny_facts()
    model = EditableCausalLM.from_pretrained(str(tiny_model_path()))
    for source, target in ((0, 1), (2, 3)):
        model.edit(tiny_fact_group(source, target, ("en", "zh"), data), LafnConfig(steps=60), progress=False)
    model.save_pretrained(directory)
    templates, facts = data["templates"], data["facts"]
    prompt = [t.format(s=facts[i][lang]["subject"]) for i in (0, 2) for lang in ("en", "zh") for t in templates[lang]]
    other = [t.format(s=facts[i][lang]["subject"]) for i in (5, 6) for lang in ("en", "zh") for t in templates[lang]]
    return directory, prompt, other


def bank_prompts(directory: Path) -> list[str]:
    config = json.loads((directory / "lafn_config.json").read_text("utf-8"))
    entries = config.get("entries", [])
    prompts = [p for entry in entries for p in entry.get("metadata", {}).get("prompts", {}).values()]
    if not prompts:
        raise SystemExit(f"{directory}: the bank's entries record no prompts; cannot build matched requests")
    return prompts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: str, bank: Path | None, continuous_batching: bool,
                 threads: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """``lafn serve`` in a child process (which starts the model's process) with ``threads`` torch threads each
    (1: no OpenMP stragglers on a shared CPU, and the tiny model gains nothing from more)."""
    port = free_port()
    command = [sys.executable, "-m", "lafn_hf.cli", "serve", "--model", model, "--port", str(port)]
    command += ["--bank", f"demo={bank}"] if bank else []
    command += ["--continuous-batching"] if continuous_batching else []
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}: {' '.join(command)}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1).read()
            return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not start in 300 s")


def load(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """``requests`` completions spread over ``clients`` threads; latency of each, wall time of all."""
    jobs = [prompts[i % len(prompts)] for i in range(requests)]
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        api = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        barrier.wait()
        for prompt in jobs[index::clients]:
            start = time.perf_counter()
            api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"rps": len(ordered) / wall, "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "wall": wall}


def answers(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    api = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return [str(api.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text)
            for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--bank", help="bank directory (default on the tiny model: made here)")
    parser.add_argument("--clients", default="8,32", help="concurrent clients, comma-separated (default 8,32)")
    parser.add_argument("--requests", type=int, default=200, help="per configuration and client count")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server process")
    parser.add_argument("--no-baseline", action="store_true", help="only the configurations with the bank")
    args = parser.parse_args()
    client_counts = [int(count) for count in args.clients.split(",")]
    if args.bank:
        bank, matched, unmatched = Path(args.bank), bank_prompts(Path(args.bank)), UNRELATED
    elif args.model == TINY_MODEL:
        bank, matched, unmatched = tiny_bank(Path(tempfile.mkdtemp(prefix="lafn-serve-load-")) / "bank")
    else:
        raise SystemExit("--bank is required for models other than tiny-bilingual")
    prompts = [p for pair in zip(matched, unmatched) for p in pair]  # half matched, half not
    configurations = [("bank", bank, False), ("bank, CB", bank, True)]
    if not args.no_baseline:
        configurations = [("no bank", None, False), ("no bank, CB", None, True), *configurations]
    results: dict[tuple[str, int], dict[str, float]] = {}
    outputs = {}
    load_before = os.getloadavg()[0]
    for label, bank_dir, cb in configurations:
        process, url = start_server(args.model, bank_dir, cb, args.threads)
        try:
            answers(url, args.model, prompts[:4], args.max_tokens)  # warm-up (CB sizes its cache here)
            outputs[label] = answers(url, args.model, matched, args.max_tokens)
            for clients in client_counts:
                results[label, clients] = load(url, args.model, prompts, clients, args.requests, args.max_tokens)
        finally:
            process.terminate()
            process.wait(timeout=30)
    report(args, results, outputs, client_counts, load_before, len(matched))


def report(args: argparse.Namespace, results: dict[tuple[str, int], dict[str, float]], outputs: dict[str, list[str]],
           client_counts: list[int], load_before: float, matched: int) -> None:
    same = sum(a == b for a, b in zip(outputs["bank, CB"], outputs["bank"]))
    changed = f"{sum(a != b for a, b in zip(outputs['bank'], outputs['no bank']))}/{matched}" if "no bank" in outputs \
        else "not measured"
    print(f"model {args.model}, {args.requests} completions of {args.max_tokens} tokens per configuration and client "
          f"count, half naming an edited subject; edited answers changed by the bank: {changed}, the same with and "
          f"without CB: {same}/{matched}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} cores, {args.threads} torch thread(s) per server process)")
    print("\n| configuration | clients | requests/s | p50 latency (s) | p95 latency (s) |\n| --- | --- | --- | --- | --- |")
    for (label, clients), r in results.items():
        print(f"| {label} | {clients} | {r['rps']:.1f} | {r['p50']:.3f} | {r['p95']:.3f} |")
    print()
    pairs = [("bank, CB", "bank")] + ([("bank", "no bank"), ("bank, CB", "no bank, CB")] if "no bank" in outputs else [])
    for clients in client_counts:
        for label, base in pairs:
            r, b = results[label, clients], results[base, clients]
            print(f"{clients} clients, {label} / {base}: requests/s x{r['rps'] / b['rps']:.2f}, "
                  f"p50 x{r['p50'] / b['p50']:.2f}, p95 x{r['p95'] / b['p95']:.2f}")


if __name__ == "__main__":
    main()
