"""What a meta-step costs against the plain contrastive step it replaces, measured in one run.

Every measurement times ``MetaContrastiveModule.meta_step`` + backward + AdamW on meta-batches held in
memory (random images and prompts of the episode shape), ``--warmup`` untimed steps then ``--steps``
timed ones, and prints one JSON line. Measured:

- ``gemm``: a dense matrix product (bf16 on a GPU, fp32 on a CPU): the machine's achievable FLOP/s;
- ``step``: plain contrastive (no conditioning, no inner loop), then DCMCL for each adapted scope, order and
  1 or 5 inner steps: ms/step, the ratio to the plain step, FLOPs per step (``torch.profiler``'s count),
  achieved FLOP/s as a fraction of ``gemm``, and peak memory;
- ``tasks``: 4 against 16 tasks per meta-batch, one backward through the meta-batch against one per task
  (``model.backward_per_task``; peak memory; a GPU that runs out says so);
- ``engine``: the torch.func engine (``meta_engine=func``) against learn2learn's at 8 tasks, 1 and 5 inner steps;
- ``grid``: step time as ways, shots and tasks grow (film+heads, second order).

Peak memory: on a GPU, the allocator's peak; on a CPU (Linux), the peak resident memory above the start of
the measurement (freed heap is handed back first, ``malloc_trim``, so that reused memory does not hide it).

Presets: ``tiny`` (the default towers at 32 px, the CPU configuration) and ``vit`` (a random ViT-B/16 at
224 px and a random BERT of MiniLM's shape written to a temporary folder, bf16 autocast: the GPU
configuration of the speed issue). The markdown table goes to ``--out`` (bench/results/).

Usage:
    python bench/speed.py [--preset tiny|vit] [--device auto|cpu|cuda] [--steps 8] [--warmup 2] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from metacontrastive.data.episodes import Task
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.module import MetaContrastiveModule


@dataclasses.dataclass(frozen=True)
class Shape:
    ways: int = 5
    shots: int = 5
    queries: int = 15
    tasks: int = 4


def _tasks(shape: Shape, size: int, device: torch.device, seed: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(shape.tasks):
        support = torch.rand(shape.ways * shape.shots, 3, size, size, generator=g)
        query = torch.rand(shape.ways * shape.queries, 3, size, size, generator=g)
        tasks.append(Task(
            domain=("natural", "medical")[t % 2], domain_id=t % 2,
            texts=[f"a photo of a thing of kind {t}-{c}" for c in range(shape.ways)],
            support_images=support.to(device), support_labels=torch.arange(shape.ways, device=device).repeat_interleave(shape.shots),
            query_images=query.to(device), query_labels=torch.arange(shape.ways, device=device).repeat_interleave(shape.queries),
            classes=[f"kind {t}-{c}" for c in range(shape.ways)]))
    return tasks


def _random_minilm(folder: Path) -> str:
    """A randomly initialised BERT of all-MiniLM-L6-v2's shape, with a tokenizer, saved for ``hf:``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789-",
             "a", "photo", "of", "thing", "kind"]
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    words += [f"unused{i}" for i in range(30522 - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return f"hf:{folder}"


def _resident_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS now, VmHWM the peak since the last reset); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuPeak:
    """Peak resident memory of this process above its level at ``start()`` (Linux): freed heap is returned to
    the system first (glibc's ``malloc_trim``) and the kernel's high-water mark reset (``/proc/self/clear_refs``)."""

    def start(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _resident_kib("VmRSS")
        except OSError:
            self.base = None

    def gib(self) -> float | None:
        peak = _resident_kib("VmHWM")
        return None if self.base is None or peak is None else (peak - self.base) / 2**20


class Bench:
    def __init__(self, preset: str, device: torch.device, steps: int, warmup: int, text_folder: Path) -> None:
        self.device, self.steps, self.warmup = device, steps, warmup
        if preset == "vit":
            self.size = 224
            self.encoder = EncoderConfig(image_tower="timm:vit_base_patch16_224", text_tower=_random_minilm(text_folder),
                                         image_size=224)
        else:
            self.size = 32
            self.encoder = EncoderConfig()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and preset == "vit"
                         else contextlib.nullcontext())

    def module(self, plain: bool, encoder_options: dict | None = None, **options) -> MetaContrastiveModule:
        torch.manual_seed(0)
        encoder = dataclasses.replace(self.encoder, condition_image=not plain, condition_text=not plain,
                                      **(encoder_options or {}))
        kwargs = dict(method="contrastive", align_weight=0.0) if plain else dict(method="dcmcl", domain_dropout=0.0)
        module = MetaContrastiveModule(encoder=encoder, **kwargs, **options).to(self.device).train()
        module.log = lambda *args, **kwargs: None  # no Trainer here: nothing to log to
        return module

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_step(self, module: MetaContrastiveModule, shape: Shape) -> dict:
        """ms per step, FLOPs per step and peak GiB of meta_step + backward + AdamW (the peak over every step,
        warm-up included: the first step allocates the optimizer's state)."""
        batch = _tasks(shape, self.size, self.device)
        cpu_peak = CpuPeak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            cpu_peak.start()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                loss = module.meta_step(batch, "train")
            loss.backward()
            optimizer.step()

        for _ in range(self.warmup):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as profile:
            step()  # FLOPs of matrix products and convolutions, forward and backward (the profiler's count)
        flop = sum(e.flops for e in profile.key_averages() if e.flops)
        self._sync()
        start = time.perf_counter()
        for _ in range(self.steps):
            step()
        self._sync()
        ms = 1000 * (time.perf_counter() - start) / self.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else cpu_peak.gib()
        return {"ms": ms, "flop": flop, "peak_gib": peak}

    def gemm(self, n: int | None = None) -> float:
        """FLOP/s of a dense n x n matrix product: bf16 on a GPU, fp32 on a CPU."""
        n = n or (8192 if self.device.type == "cuda" else 1024)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        self._sync()
        repeats = 20 if self.device.type == "cuda" else 10
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        self._sync()
        return 2 * n**3 * repeats / (time.perf_counter() - start)


CONFIGS = [  # (name, plain, options)
    ("plain contrastive", True, {}),
    ("dcmcl film+heads, 2nd order, 1 inner step", False, dict(adapt_scope="film+heads", inner_steps=1)),
    ("dcmcl film+heads, 1st order, 1 inner step", False, dict(adapt_scope="film+heads", inner_steps=1, first_order=True)),
    ("dcmcl film+heads, 2nd order, 5 inner steps", False, dict(adapt_scope="film+heads", inner_steps=5)),
    ("dcmcl all, 1st order", False, dict(adapt_scope="all", first_order=True)),
    ("dcmcl all, 2nd order", False, dict(adapt_scope="all")),
    ("dcmcl all, 2nd order, backward per task", False, dict(adapt_scope="all", backward_per_task=True)),
]
PER_TASK = ("dcmcl film+heads, 2nd order, 1 inner step, backward per task", False,
            dict(adapt_scope="film+heads", inner_steps=1, backward_per_task=True))
CHECKPOINTED = ("dcmcl film+heads, 2nd order, 1 inner step, backward per task, towers checkpointed", False,
                dict(adapt_scope="film+heads", inner_steps=1, backward_per_task=True), dict(grad_checkpointing=True))


def _emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def _measure(bench: Bench, module_fn, shape: Shape) -> dict:
    """Run one measurement; a GPU that runs out of memory gives ``{"error": "out of memory"}``."""
    try:
        return bench.time_step(module_fn(), shape)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


def run(args) -> list[dict]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        bench = Bench(args.preset, device, args.steps, args.warmup, Path(folder))
        peak = bench.gemm()
        _emit({"measure": "gemm", "device": str(device), "threads": torch.get_num_threads(), "flop_per_s": peak}, rows)
        shape = Shape()
        plain_ms = None
        for name, plain, options in CONFIGS:
            m = _measure(bench, lambda: bench.module(plain, **options), shape)
            if "ms" in m:
                plain_ms = plain_ms or m["ms"]
                m |= {"vs_plain": m["ms"] / plain_ms, "flop_per_s": m["flop"] / (m["ms"] / 1000),
                      "of_gemm_peak": m["flop"] / (m["ms"] / 1000) / peak}
            _emit({"measure": "step", "config": name, **m}, rows)
        # tower checkpointing where the towers have it (timm and transformers: the vit preset)
        per_task = [(*config, None) for config in (*CONFIGS[:2], PER_TASK)] + ([CHECKPOINTED] if args.preset == "vit" else [])
        for tasks in (4, 16):
            for name, plain, options, encoder in per_task:
                m = _measure(bench, lambda: bench.module(plain, encoder, **options), dataclasses.replace(shape, tasks=tasks))
                _emit({"measure": "tasks", "config": name, "tasks": tasks, **m}, rows)
        for steps in (1, 5):  # the torch.func engine against learn2learn's at 8 tasks
            base = None
            for engine in ("l2l", "func"):
                m = _measure(bench, lambda: bench.module(False, meta_engine=engine, inner_steps=steps),
                             dataclasses.replace(shape, tasks=8))
                base = base or m.get("ms")
                _emit({"measure": "engine", "engine": engine, "inner_steps": steps, "tasks": 8, **m,
                       "speedup_vs_l2l": base / m["ms"] if "ms" in m and base else None}, rows)
        for ways, shots, tasks in [(5, 1, 4), (5, 5, 4), (10, 5, 4), (5, 5, 8), (20, 5, 4)]:
            grid = Shape(ways=ways, shots=shots, queries=shape.queries, tasks=tasks)
            m = _measure(bench, lambda: bench.module(False), grid)
            _emit({"measure": "grid", "ways": ways, "shots": shots, "tasks": tasks,
                   "images": tasks * ways * (shots + shape.queries), **m}, rows)
    return rows


def markdown(rows: list[dict], preset: str) -> str:
    gemm = rows[0]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# Meta-step cost, preset `{preset}` on {gemm['device']} ({gemm['threads']} threads)", "",
             f"Dense matrix product: {gemm['flop_per_s'] / 1e12:.3f} TFLOP/s.", "",
             "| configuration | ms/step | vs plain | GFLOP/step | of GEMM peak | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["measure"] == "step":
            if "error" in r:
                lines.append(f"| {r['config']} | {r['error']} | | | | |")
            else:
                lines.append(f"| {r['config']} | {r['ms']:.1f} | {r['vs_plain']:.2f} | {r['flop'] / 1e9:.1f} | "
                             f"{r['of_gemm_peak']:.1%} | {fmt(r['peak_gib'], '.1f')} |")
    lines += ["", "| configuration | tasks | ms/step | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['tasks']} | {fmt(r.get('ms'), '.1f') or r.get('error')} | {fmt(r.get('peak_gib'), '.1f')} |"
              for r in rows if r["measure"] == "tasks"]
    lines += ["", "| engine (film+heads, 2nd order, 8 tasks) | inner steps | ms/step | speed-up vs l2l | peak GiB |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['inner_steps']} | {fmt(r.get('ms'), '.1f') or r.get('error')} | "
              f"{fmt(r.get('speedup_vs_l2l'), '.2f')} | {fmt(r.get('peak_gib'), '.1f')} |" for r in rows if r["measure"] == "engine"]
    lines += ["", "| ways | shots | tasks | images | ms/step | peak GiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['ways']} | {r['shots']} | {r['tasks']} | {r['images']} | {fmt(r.get('ms'), '.1f') or r.get('error')} | "
              f"{fmt(r.get('peak_gib'), '.1f')} |" for r in rows if r["measure"] == "grid"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "vit"], default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    device = rows[0]["device"].split(":")[0]
    path = Path(args.out) / f"speed-{args.preset}-{device}.md"
    path.write_text(markdown(rows, args.preset))
    print(f"table: {path}")


if __name__ == "__main__":
    main()
