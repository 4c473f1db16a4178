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

``--mixed`` runs issue 35's load instead: ``--clients`` (default 16) concurrent clients x ``--per-client`` (50)
requests each, completions and chat, streaming and not, edited and unedited prompts, every tenth streaming request
from a client that leaves after its first chunk; every answer must equal the single-request answer the same server
gave before the load (and after it), with 0 errors. Prints p50/p95 per kind of request, with and without the bank,
and their ratios.

    python benchmarks/serve_load.py --mixed [--clients 16] [--per-client 50] [--cb]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    command += ["--no-admin"]  # no admin token file for a benchmark
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


def run_clients(worker: Callable[[int], None], clients: int, barrier: threading.Barrier) -> float:
    """Start ``clients`` threads running ``worker(i)``, release them together through ``barrier`` (which the
    workers also wait on) and return the wall time until the last one finishes."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


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

    wall = run_clients(worker, clients, barrier)
    ordered = sorted(latencies)
    return {"rps": len(ordered) / wall, "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "wall": wall}


def answers(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    api = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return [str(api.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text)
            for p in prompts]

Job = tuple[str, bool, str, bool]  # (completion or chat, streaming, prompt, leaves after the first chunk)


def ask(api: OpenAI, model: str, job: Job, max_tokens: int) -> str | None:
    """One request of the mixed load: its text (``None`` for a client that leaves mid-stream)."""
    call, stream, prompt, leaves = job
    if call == "completion":
        response: Any = api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=stream)
    else:
        response = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0, stream=stream)
    if not stream:
        return str(response.choices[0].text if call == "completion" else response.choices[0].message.content)
    parts = []
    for chunk in response:
        if chunk.choices:
            parts.append(chunk.choices[0].text if call == "completion" else chunk.choices[0].delta.content or "")
        if leaves:
            response.close()  # the client leaves: the server must stop this request, and nothing else
            return None
    return "".join(parts)


def mixed_jobs(prompts: list[str], clients: int, per_client: int, seed: int = 0) -> list[list[Job]]:
    """Each client's requests: kinds, prompts and streaming mixed evenly, every tenth streaming one left early."""
    generator = random.Random(seed)
    kinds = [(call, stream) for call in ("completion", "chat") for stream in (False, True)]
    jobs: list[list[Job]] = []
    for client in range(clients):
        mine = []
        for index in range(per_client):
            call, stream = kinds[(client + index) % len(kinds)]
            leaves = stream and (client * per_client + index) % 10 == 3
            mine.append((call, stream, prompts[(client * 7 + index) % len(prompts)], leaves))
        generator.shuffle(mine)
        jobs.append(mine)
    return jobs


def mixed_load(url: str, model: str, prompts: list[str], clients: int, per_client: int,
               max_tokens: int) -> dict[str, Any]:
    """Issue 35's load on one server: every answer against the single-request answer given before (and after)."""
    api = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    single = {(call, prompt): ask(api, model, (call, False, prompt, False), max_tokens)
              for call in ("completion", "chat") for prompt in prompts}
    jobs = mixed_jobs(prompts, clients, per_client)
    latencies: dict[tuple[str, bool], list[float]] = {}
    errors: list[str] = []
    mismatches: list[tuple[Job, str | None]] = []
    left = 0
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        nonlocal left
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        barrier.wait()
        for job in jobs[index]:
            start = time.perf_counter()
            try:
                text = ask(client, model, job, max_tokens)
            except Exception as error:  # counted: the load must give none
                with lock:
                    errors.append(f"{job[:2]}: {type(error).__name__}: {error}")
                continue
            took = time.perf_counter() - start
            with lock:
                if job[3]:
                    left += 1
                elif text != single[job[0], job[2]]:
                    mismatches.append((job, text))
                else:
                    latencies.setdefault(job[:2], []).append(took)

    wall = run_clients(worker, clients, barrier)
    after = {key: ask(api, model, (key[0], False, key[1], False), max_tokens) for key in single}
    answered = sum(map(len, latencies.values()))
    every = sorted(t for values in latencies.values() for t in values)
    return {"errors": errors, "mismatches": mismatches, "left": left, "answered": answered, "wall": wall,
            "same_after": after == single, "single": single, "latency": {
                **{kind: percentiles(values) for kind, values in sorted(latencies.items())}, ("all", False):
                percentiles(every)}}


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def run_mixed(args: argparse.Namespace, bank: Path, prompts: list[str], matched: list[str]) -> int:
    clients = int(args.clients) if args.clients != parser_default_clients() else 16
    configurations = [("no bank", None, False), ("bank", bank, False)]
    if args.cb:
        configurations += [("no bank, CB", None, True), ("bank, CB", bank, True)]
    results = {}
    for label, bank_dir, cb in configurations:
        process, url = start_server(args.model, bank_dir, cb, args.threads)
        try:
            results[label] = mixed_load(url, args.model, prompts, clients, args.per_client, args.max_tokens)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"model {args.model}: {clients} clients x {args.per_client} requests per configuration (completions and "
          f"chat, streaming and not, half the prompts edited, every tenth streaming request left after its first "
          f"chunk), {args.max_tokens} tokens; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    print("\n| configuration | answered | left mid-stream | errors | answers != single request | same after | "
          "wall (s) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['answered']} | {r['left']} | {len(r['errors'])} | {len(r['mismatches'])} | "
              f"{r['same_after']} | {r['wall']:.1f} |")
    print("\n| configuration | request | p50 (s) | p95 (s) |\n| --- | --- | --- | --- |")
    for label, r in results.items():
        for (call, stream), (p50, p95) in r["latency"].items():
            print(f"| {label} | {call}{', stream' if stream else ''} | {p50:.3f} | {p95:.3f} |")
    for label, base in (("bank", "no bank"), ("bank, CB", "no bank, CB")):
        if label in results:
            for kind, (p50, p95) in results[label]["latency"].items():
                b50, b95 = results[base]["latency"][kind]
                print(f"{label} / {base}, {kind[0]}{', stream' if kind[1] else ''}: p50 x{p50 / b50:.2f}, "
                      f"p95 x{p95 / b95:.2f}")
    changed = sum(results["bank"]["single"][call, p] != results["no bank"]["single"][call, p]
                  for call in ("completion", "chat") for p in matched)
    print(f"edited prompts whose answer the bank changed: {changed}/{2 * len(matched)}")
    failures = sum(len(r["errors"]) + len(r["mismatches"]) + (not r["same_after"]) for r in results.values())
    for label, r in results.items():
        for line in [*r["errors"][:5], *map(str, r["mismatches"][:5])]:
            print(f"{label}: {line}")
    return 1 if failures else 0


def parser_default_clients() -> str:
    return "8,32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--bank", help="bank directory (default on the tiny model: made here)")
    parser.add_argument("--clients", default=parser_default_clients(),
                        help="concurrent clients, comma-separated (default 8,32; --mixed: one count, default 16)")
    parser.add_argument("--requests", type=int, default=200, help="per configuration and client count")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server process")
    parser.add_argument("--no-baseline", action="store_true", help="only the configurations with the bank")
    parser.add_argument("--mixed", action="store_true", help="issue 35's mixed load (see above); exit 1 on any error")
    parser.add_argument("--per-client", type=int, default=50, help="--mixed: requests per client")
    parser.add_argument("--cb", action="store_true", help="--mixed: with continuous batching too")
    args = parser.parse_args()
    client_counts = [int(count) for count in args.clients.split(",")]
    if args.bank:
        bank, matched, unmatched = Path(args.bank), bank_prompts(Path(args.bank)), UNRELATED
    elif args.model == TINY_MODEL:
        bank, matched, unmatched = tiny_bank(Path(tempfile.mkdtemp(prefix="lafn-serve-load-")) / "bank")
    else:
        raise SystemExit("--bank is required for models other than tiny-bilingual")
    prompts = [p for pair in zip(matched, unmatched) for p in pair]  # half matched, half not
    if args.mixed:
        raise SystemExit(run_mixed(args, bank, prompts, matched))
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
