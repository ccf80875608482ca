"""What `apb ask`, `apb bench` and `apb eval` share: option values, their checks, and the one error handler.

Each command's options are one frozen dataclass (`AskOptions`, `BenchOptions`, `EvalOptions`) built from the
typer signature and checked once in `__post_init__`, in the order the options are documented, so bad input is
ONE `InputError` naming the first bad option before any model work. The few values with a default that depends
on the machine (device, hosts, eval's output file) are resolved there too, so what a command body reads is
what runs.

`run_command` is the one place a command's failure turns into an exit code and one stderr line.
Nothing here imports torch or transformers at module level: `apb --help` and option errors stay fast.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apb_core.dist.env import read_env
from apb_core.errors import InputError

if TYPE_CHECKING:  # imported for real only where a config is built: it pulls in torch
    from apb_core.bench import BenchConfig

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
LAYOUTS = ("balanced", "equal")  # apb_core.algorithm.methods.LAYOUTS (a test keeps them equal)
DECODE_MODES = ("auto", "eager", "static", "graph")  # apb_core.runtime.engine.DECODE_MODES (a test keeps them equal)
# apb_core.algorithm.methods.METHODS (ask's and eval's methods), written out: importing it pulls in torch, and
# option errors must be fast (tests/test_cli.py checks that the two agree).
METHODS = ("apb", "star", "full")
TRUNCATE_MODES = ("none", "middle", "end")
# apb_core.algorithm.methods.SCORERS, written out (fast option errors); retaining_heads needs --retaining-heads FILE
COMPRESSORS = ("query_aware", "retaining_heads", "random")
DEFAULT_PRESET = "llama-3.1-8b"  # bench's model shape on GPUs when neither --preset nor --model is given
DEFAULT_CPU_PRESET = "smollm2-135m"  # ... and on CPU (the embedded model's shape: an 8B model needs 32 GB per host)
MAX_HOSTS = 1024  # sanity bounds: a typo like --hosts 1000000 must be one error line, not a fork bomb
MAX_THREADS = 4096
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63  # seeds are int64 in torch
TOKEN_SCALES = {"k": 1024, "m": 1024 * 1024}  # as RULER's 4K = 4096
# CPU workers are processes that split the cores. On a 2-core machine one host was faster end to end than two
# (docs/benchmarks.md, CPU: same answer, 19.6 s vs 23.0 s; two hosts pay gloo collectives per layer and token),
# so machines with fewer than MIN_CORES_FOR_TWO_HOSTS cores run one host; others keep the two of the ask contract.
MIN_CORES_FOR_TWO_HOSTS = 4


# ---- shared values and checks -------------------------------------------------------------------------------


def default_cpu_hosts(cores: int | None = None) -> int:
    """`--hosts` on CPU when not given: 1 below MIN_CORES_FOR_TWO_HOSTS cores, else 2 (see above for why)."""
    cores = (os.cpu_count() or 1) if cores is None else cores
    return 1 if cores < MIN_CORES_FOR_TWO_HOSTS else 2


def host_notes(device: str, hosts_given: int | None, hosts: int, method: str = "",
               cores: int | None = None, workers: int | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(notes, warnings) about the host count, for stderr and the JSON: the default of one host that small CPUs
    get (a choice apb made on its own) and more CPU hosts than cores (each host is a process)."""
    if read_env().torchrun is not None:  # the hosts are torchrun's processes, one per rank: nothing was chosen
        return (), ()
    cores = (os.cpu_count() or 1) if cores is None else cores
    workers = hosts if workers is None else workers
    notes: list[str] = []
    warnings: list[str] = []
    if device == "cpu" and hosts_given is None and hosts == 1 and cores < MIN_CORES_FOR_TWO_HOSTS:
        exact = f"; --method {method} runs exact attention on one host" if method in ("apb", "star") else ""
        notes.append(f"1 host: this machine has {cores} CPU core(s), and below {MIN_CORES_FOR_TWO_HOSTS} one host "
                     f"ran faster than two{exact} (--hosts 2 splits the document anyway)")
    if device == "cpu" and hosts > cores and workers > cores:
        warnings.append(f"{hosts} hosts on {cores} CPU core(s): each host is a process with its own model and "
                        f"threads, so they fight for the cores and run slower; use --hosts {cores} or fewer, or "
                        f"--workers {cores} to run the {hosts} hosts in {cores} process(es) that take turns")
    return tuple(notes), tuple(warnings)


def cuda_count() -> int:
    """How many CUDA GPUs torch sees (0 without a CUDA build). Imports torch, so it is called only when needed.

    Counted through NVML, without initialising CUDA in this process: the workers are forked from it, and a
    CUDA driver initialised before a fork does not work in the children (`torch.cuda.is_available()` would
    initialise it; with PYTORCH_NVML_BASED_CUDA_CHECK=1, set here for whatever else asks, it asks NVML too)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


@dataclass(frozen=True)
class Placement:
    """Where the hosts run: the device, H hosts in W worker processes (H/W each, taking turns when W < H), and
    the note apb owes the user when it chose W < H on its own."""

    device: str
    hosts: int
    workers: int
    notes: tuple[str, ...] = ()


def resolve_device_hosts(device: str, hosts: int | None, cuda_count: Callable[[], int],
                         workers: int | None = None) -> Placement:
    """`--device` auto|cpu|cuda, `--hosts` and `--workers` (None: the defaults) -> the placement that runs.

    auto means cuda when a GPU is visible. Default hosts: every visible GPU on cuda, `default_cpu_hosts()` on
    CPU. Default workers: one per host, except on cuda with more hosts than GPUs: the most GPUs that divide the
    hosts, said in a note (the math is the same; the hosts of a GPU run one after the other). `cuda_count` is
    called only for auto and cuda (it imports torch, which takes a second).
    """
    gpus = cuda_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and gpus == 0:
        raise InputError("--device cuda: no CUDA GPU is visible")
    resolved = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
    if hosts is None:
        hosts = gpus if resolved == "cuda" else default_cpu_hosts()
    check_at_least("--workers", workers, 1)
    if workers is not None:
        if workers > hosts or hosts % workers:
            raise InputError(f"--workers {workers} must divide --hosts {hosts} (each worker process runs "
                             "the same number of hosts)")
        if resolved == "cuda" and workers > gpus:
            raise InputError(f"--workers {workers} needs {workers} GPUs but only {gpus} are visible")
        return Placement(resolved, hosts, workers)
    if resolved == "cuda" and hosts > gpus:
        chosen = max(w for w in range(1, gpus + 1) if hosts % w == 0)
        note = (f"{hosts} hosts on {gpus} GPU(s): {chosen} worker process(es) of {hosts // chosen} hosts each, "
                "which take turns (the same math; --workers sets it)")
        return Placement(resolved, hosts, chosen, (note,))
    return Placement(resolved, hosts, hosts)


def parse_tokens(text: str) -> list[int]:
    """'2k,32k,128k', '7.5k', '1m' or '131072' -> token counts (k = 1024, m = 1024²), in the order given.

    Used by `--len` of bench and eval; raises InputError naming `--len` when a part is not a whole positive
    number of tokens or nothing is given. Duplicates are kept (the caller decides).
    """
    counts = []
    for part in split_list(text):
        item = part.lower()
        scale = TOKEN_SCALES.get(item[-1:], 1)
        try:
            value = float(item[:-1] if scale > 1 else item) * scale
        except ValueError:
            raise InputError(f"--len: {part!r} is not a token count like 2k, 7.5k, 128k or 131072") from None
        if not math.isfinite(value) or value < 1 or not value.is_integer():
            raise InputError(f"--len: {part!r} is not a whole positive number of tokens")
        counts.append(int(value))
    if not counts:
        raise InputError("--len: no length given")
    return counts


def parse_passing_len(value: str | int | None) -> int | str | None:
    """`--passing-len`: 'all' (every earlier token, exact), a whole number >= 0, or None (by context length)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return "all"
        try:
            value = int(text)
        except ValueError:
            raise InputError(f"--passing-len must be a whole number or 'all' (got {value!r})") from None
    if value < 0:
        raise InputError(f"--passing-len must not be negative (got {value})")
    return value


def split_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: a comma list as the options take it (empty parts dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def check_choice(option: str, value: str, choices: Iterable[str]) -> None:
    """InputError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"{option} must be one of {', '.join(choices)} (got {value!r})")


def check_at_least(option: str, value: int | None, low: int) -> None:
    """InputError when `value` is given and below `low`."""
    if value is not None and value < low:
        raise InputError(f"{option} must be at least {low} (got {value})")


def check_at_most(option: str, value: float | None, high: float) -> None:
    """InputError when `value` is given and above `high` (NaN fails too)."""
    if value is not None and not value <= high:
        raise InputError(f"{option} must be at most {high} (got {value})")


def check_not_negative(option: str, value: int | None) -> None:
    """InputError when `value` is given and negative."""
    if value is not None and value < 0:
        raise InputError(f"{option} must not be negative (got {value})")


def _resolve(options: Any, **values: Any) -> None:
    """Store resolved values on a frozen options object (only ever called from its `__post_init__`)."""
    for name, value in values.items():
        object.__setattr__(options, name, value)


# ---- per-command options ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AskOptions:
    """`apb ask`'s options, checked once. Given as typed; `device`, `hosts` (None: default) and `passing_len`
    (text) are stored resolved: 'cpu'/'cuda', a count, and a count/'all'/None."""

    path: str
    questions: tuple[str, ...]  # QUESTION then every -q, in order
    model: str | None
    hosts: int | None
    device: str
    method: str
    workers: int | None = None  # worker processes (None: one per host; fewer GPUs than hosts: see Placement)
    anchor_len: int | None
    passing_len: int | str | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    truncate: str
    json_output: bool
    quiet: bool
    allow_pickle: bool
    threads: int | None
    dtype: str
    auto_exact: bool
    layout: str = "balanced"
    system: str | None = None
    shared_prefill: bool | None = None  # several questions over one prefill (None: apb_core.ask's default)
    cite: bool = False  # citations after the answer (apb_core.citations)
    compressor: str | None = None  # apb's passing scorer (None: query_aware); resolve_compressor
    retaining_heads: str | None = None  # safetensors heads file for --compressor retaining_heads
    question_in_anchor: bool = True
    notes: tuple[str, ...] = field(default=(), init=False)  # choices apb made on its own (stderr and JSON)
    warnings: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        check_questions(self.questions)
        if self.system is not None and not self.system.strip():
            raise InputError("--system is empty (leave it out for the model's default system prompt)")
        check_choice("--layout", self.layout, LAYOUTS)
        check_at_least("--hosts", self.hosts, 1)
        check_choice("--device", self.device, DEVICES)
        check_choice("--method", self.method, METHODS)
        check_choice("--truncate", self.truncate, TRUNCATE_MODES)
        placed = resolve_device_hosts(self.device, self.hosts, cuda_count, self.workers)
        device, hosts = placed.device, placed.hosts
        passing_len = parse_passing_len(self.passing_len)
        check_not_negative("--anchor-len", self.anchor_len)
        check_at_least("--max-new-tokens", self.max_new_tokens, 1)
        if not self.temperature >= 0:  # written so that NaN fails too
            raise InputError(f"--temperature must be 0 (greedy) or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1] (got {self.top_p})")
        check_at_least("--threads", self.threads, 1)
        check_at_most("--threads", self.threads, MAX_THREADS)
        check_at_most("--hosts", hosts, MAX_HOSTS)
        check_at_most("--temperature", self.temperature, MAX_TEMPERATURE)
        if not 0 <= self.seed < MAX_SEED:
            raise InputError(f"--seed must be in [0, 2^63) (got {self.seed})")
        check_choice("--dtype", self.dtype, DTYPES)
        compressor = resolve_compressor(self.compressor, self.retaining_heads)
        notes, warnings = host_notes(device, self.hosts, hosts, self.method, workers=placed.workers)
        _resolve(self, device=device, hosts=hosts, workers=placed.workers, passing_len=passing_len,
                 notes=placed.notes + notes, warnings=warnings, compressor=compressor)


def resolve_compressor(compressor: str | None, retaining_heads: str | None) -> str | None:
    """`--compressor` with `--retaining-heads FILE`: the heads file alone means the retaining_heads compressor;
    retaining_heads without a file, a file with another compressor, or a missing file is an InputError. Returns
    the compressor (None when neither option was given: the default, query_aware)."""
    if compressor is not None:
        check_choice("--compressor", compressor, COMPRESSORS)
    if retaining_heads is None:
        if compressor == "retaining_heads":
            raise InputError("--compressor retaining_heads needs --retaining-heads FILE (a safetensors file of "
                             "Locret-style heads trained for the model)")
        return compressor
    if compressor not in (None, "retaining_heads"):
        raise InputError(f"--retaining-heads is read only by --compressor retaining_heads (got {compressor})")
    if not os.path.isfile(retaining_heads):
        raise InputError(f"--retaining-heads: no such file {retaining_heads}")
    return "retaining_heads"


def check_questions(questions: tuple[str, ...]) -> None:
    """At least one question, none of them blank (the engine would answer nothing)."""
    if not questions:
        raise InputError("no question given (pass QUESTION or -q/--question)")
    for index, question in enumerate(questions, start=1):
        if not question.strip():
            which = "the question" if len(questions) == 1 else f"question {index}"
            raise InputError(f"{which} is empty")


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """`apb bench`'s options, checked once. `lengths` come parsed (`parse_tokens`, the first check); `device`,
    `hosts` (None: default) and `preset` (None: DEFAULT_PRESET unless --model) are stored resolved."""

    lengths: tuple[int, ...]
    hosts: int | None
    methods: tuple[str, ...]
    preset: str | None
    model: str | None
    repeat: int
    device: str
    json_output: bool
    plot: str | None
    decode_tokens: int
    breakdown: tuple[str, ...]  # () for none
    seed: int
    threads: int | None
    dtype: str
    quiet: bool
    decode: str = "auto"
    layout: str = "balanced"
    auto_exact: bool = False
    questions: int = 1
    cite: bool = False
    workers: int | None = None  # worker processes (None: one per host; fewer GPUs than hosts: see Placement)
    methods_given: bool = True  # --methods was typed (False: the default list, which may drop ring/ulysses)
    notes: tuple[str, ...] = field(default=(), init=False)  # choices apb made on its own (stderr and JSON)
    warnings: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        from apb_core.bench import METHODS as BENCH_METHODS  # imports torch: bench needs it anyway

        check_choice("--device", self.device, DEVICES)
        if self.preset and self.model:
            raise InputError("give --preset or --model, not both")
        unknown = [m for m in self.methods if m not in BENCH_METHODS]
        if unknown or not self.methods:
            raise InputError(f"--methods: unknown {', '.join(unknown) or '(none)'}; "
                             f"choose from {', '.join(BENCH_METHODS)}")
        if any(m not in BENCH_METHODS for m in self.breakdown):
            raise InputError(f"--breakdown takes method names or none (got {','.join(self.breakdown)!r})")
        check_at_least("--hosts", self.hosts, 1)
        placed = resolve_device_hosts(self.device, self.hosts, cuda_count, self.workers)
        device, hosts = placed.device, placed.hosts
        if self.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise InputError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--decode", self.decode, DECODE_MODES)
        check_choice("--layout", self.layout, LAYOUTS)
        check_at_least("--questions", self.questions, 1)
        preset = self.preset or (None if self.model else DEFAULT_PRESET if device == "cuda" else DEFAULT_CPU_PRESET)
        notes, warnings = host_notes(device, self.hosts, hosts, workers=placed.workers)
        notes = placed.notes + notes
        if not self.preset and not self.model and device == "cpu":
            notes += (f"model shape {preset} (the CPU default; --preset {DEFAULT_PRESET} for the GPU default)",)
        methods = self.methods
        if placed.workers < hosts:
            ring_like = [m for m in self.methods if m in ("ring", "ulysses")]
            if ring_like and self.methods_given:
                raise InputError(f"--methods {','.join(ring_like)} need one process per host: use --workers {hosts}"
                                 " or leave them out")
            if ring_like:
                methods = tuple(m for m in self.methods if m not in ring_like)
                notes += (f"{', '.join(ring_like)} left out: they need one process per host (--workers {hosts})",)
            if self.decode == "graph":
                raise InputError("--decode graph needs one process per host (hosts that take turns cannot be "
                                 f"captured in a CUDA graph): use --workers {hosts} or --decode eager")
        _resolve(self, device=device, hosts=hosts, workers=placed.workers, preset=preset, notes=notes,
                 warnings=warnings, methods=methods)

    def config(self) -> BenchConfig:
        """The `apb_core.bench.BenchConfig` these options describe (imported here: it pulls in torch)."""
        from apb_core.bench import BenchConfig

        return BenchConfig(lengths=list(self.lengths), hosts=self.hosts, methods=list(self.methods),
                           preset=self.preset, model=self.model, device=self.device, repeat=self.repeat,
                           decode_tokens=self.decode_tokens, breakdown=list(self.breakdown), seed=self.seed,
                           threads=self.threads, dtype=None if self.dtype == "auto" else self.dtype,
                           decode=self.decode, layout=self.layout, auto_exact=self.auto_exact,
                           questions=self.questions, cite=self.cite, workers=self.workers)


def parse_breakdown(text: str) -> tuple[str, ...]:
    """`--breakdown`: a comma list of bench methods, or 'none' / '' for no breakdown prefill."""
    value = text.strip().lower()
    return () if value in ("", "none") else tuple(m.strip() for m in value.split(","))


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """`apb eval`'s options, checked once. `tasks` (`expand_tasks`), `lengths` (`parse_tokens`) and `hosts`
    (`parse_host_list`) come parsed; `device` and `out` (None: a timestamped file here) are stored resolved."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int
    methods: tuple[str, ...]
    hosts: tuple[int, ...]
    model: str | None
    seed: int
    json_output: bool
    out: str | None
    compressor: str | None
    question_in_anchor: bool
    auto_exact: bool
    layout: str = "balanced"
    anchor_len: int | None
    passing_len: int | str | None
    device: str
    max_new_tokens: int | None
    threads: int | None
    quiet: bool
    split_questions: bool = False
    reuse_prefill: bool = False  # with split_questions: apb also answers each key over another key's prefill
    retaining_heads: str | None = None  # safetensors heads file for --compressor retaining_heads
    cite: bool = False  # cite sources; needle tasks record cite_hit
    workers: int | None = None  # worker processes for every --hosts value (None: one per host, or Placement's)
    workers_per_hosts: tuple[int, ...] = field(default=(), init=False)  # resolved, one per --hosts value
    notes: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        check_at_least("--samples", self.samples, 1)
        if not self.methods or any(m not in METHODS for m in self.methods):
            given = ",".join(self.methods)
            raise InputError(f"--methods must be a comma list of {', '.join(METHODS)} (got {given!r})")
        check_choice("--device", self.device, DEVICES)
        check_choice("--layout", self.layout, LAYOUTS)
        compressor = resolve_compressor(self.compressor, self.retaining_heads)
        check_not_negative("--anchor-len", self.anchor_len)
        passing_len = parse_passing_len(self.passing_len)
        check_at_least("--max-new-tokens", self.max_new_tokens, 1)
        check_at_least("--threads", self.threads, 1)
        if self.reuse_prefill and not (self.split_questions and "apb" in self.methods):
            raise InputError("--reuse-prefill needs --split-questions and the apb method")
        placements = [resolve_device_hosts(self.device, h, cuda_count, self.workers) for h in self.hosts]
        device = placements[0].device
        notes = tuple(dict.fromkeys(n for p in placements for n in p.notes))
        out = self.out if self.out is not None else time.strftime("apb-eval-%Y%m%d-%H%M%S.jsonl")
        out_dir = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(out_dir):
            raise InputError(f"--out: the folder {out_dir} does not exist")
        _resolve(self, lengths=tuple(dict.fromkeys(self.lengths)), methods=tuple(dict.fromkeys(self.methods)),
                 device=device, out=out, passing_len=passing_len, compressor=compressor,
                 workers_per_hosts=tuple(p.workers for p in placements), notes=notes)

    def ablation(self) -> dict[str, Any]:
        """The apb-only settings that differ from the defaults, as `EvalConfig.ablation` takes them."""
        ablation: dict[str, Any] = {}
        if self.compressor is not None:
            ablation["compressor"] = self.compressor
        if not self.question_in_anchor:
            ablation["question_in_anchor"] = False
        if not self.auto_exact:
            ablation["auto_exact"] = False
        if self.layout != "balanced":
            ablation["layout"] = self.layout
        if self.anchor_len is not None:
            ablation["anchor_len"] = self.anchor_len
        if self.passing_len is not None:
            ablation["passing_len"] = self.passing_len
        return ablation


def expand_tasks(text: str) -> tuple[str, ...]:
    """`--tasks`: task names and groups (all, ruler, infinitebench) -> task names, in order, once each."""
    from apb_core.eval.runner import TASK_GROUPS
    from apb_core.eval.tasks import TASKS

    tasks: list[str] = []
    for name in split_list(text):
        if name in TASK_GROUPS:
            tasks += TASK_GROUPS[name]
        elif name in TASKS:
            tasks.append(name)
        else:
            raise InputError(f"--tasks: unknown task {name!r}; choose from {', '.join([*TASK_GROUPS, *TASKS])}")
    if not tasks:
        raise InputError("--tasks: no task given")
    return tuple(dict.fromkeys(tasks))


def parse_host_list(text: str) -> tuple[int, ...]:
    """eval's `--hosts`: '2,4' -> (2, 4), every value at least 1, duplicates dropped."""
    hosts: list[int] = []
    for part in split_list(text):
        try:
            hosts.append(int(part))
        except ValueError:
            raise InputError(f"--hosts must be a comma list of whole numbers (got {text!r})") from None
    if not hosts or any(h < 1 for h in hosts):
        raise InputError(f"--hosts: every value must be at least 1 (got {text!r})")
    return tuple(dict.fromkeys(hosts))


# ---- the one error handler ----------------------------------------------------------------------------------
