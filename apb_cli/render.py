"""Terminal output for `apb ask`: the answer on stdout, everything else on stderr.

stdout carries only answer text (streamed token by token, each answer ending with a newline) or, with
`--json`, one JSON object; so `apb ask doc.pdf "..." > answer.txt` captures the answer and nothing else.
With several questions each answer is headed by a line `==> Qn: <question> <==` and answers are separated by
a blank line (`head`'s convention for several files), so `csplit`/`awk` can split the output on those lines.
Progress bars (one per (phase, host)), warnings, logs and the timing tables go to stderr through a rich
`Console(stderr=True)`, and `--quiet` silences all of them.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from apb_core.api import AskResult, Citation, Event

# The order phases are shown in the timing table; keys the engine adds beyond these follow in its order.
TIMING_KEYS = ("convert_s", "load_s", "tokenize_s", "prefill_s", "query_s", "decode_s", "total_s")

# Bars for these phases are hidden while an answer streams to the same terminal: one line of text and a
# redrawn bar cannot share the screen.
_STREAMING_PHASES = frozenset({"decode"})


class Renderer:
    """Turns the engine's `Event`s into stdout answer text and stderr progress.

    stream_answers: write token events to stdout (False with `--json`, where stdout holds only the JSON).
    quiet: nothing on stderr at all (errors are printed by the caller, not here).
    questions: the questions in order, for the "Q: ..." headers when there is more than one.
    """

    def __init__(
        self,
        *,
        questions: list[str],
        stream_answers: bool,
        quiet: bool,
        console: Console | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.questions = questions
        self.stream_answers = stream_answers
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)
        self.out = out or sys.stdout
        # When stdout is the terminal the bars are drawn on, they pause while text streams (see above).
        self._pause_bars_for_tokens = stream_answers and _isatty(self.out)
        self._progress: Progress | None = None
        self._tasks: dict[tuple[str, int], TaskID] = {}
        self._question = -1  # index of the question whose output is current
        self._streaming = False  # answer text is being written to stdout right now
        self._line_open = False  # stdout's last character is not a newline
        self._answer_chars = 0  # characters streamed for the current answer
        self._streamed: set[int] = set()  # questions whose answer came through token events
        self._labelled: set[int] = set()  # questions whose `==> Qn: ... <==` line stdout has
        self.warnings: list[str] = []  # every warning, shown or not (--quiet): the JSON's `warnings`
        self.notes: list[str] = []  # choices apb made on its own, shown or not: the JSON's `notes`

    # -- stderr messages -------------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        """A warning line on stderr (above any bars); silent with --quiet."""
        self.warnings.append(message)
        if not self.quiet:
            self._separate_from_answer()
            self.console.print(f"[yellow]apb: warning:[/] {_escape(message)}")

    def notice(self, message: str, choice: bool = True) -> None:
        """An `apb: note:` line on stderr (silent with --quiet); `choice`: a choice apb made on its own, which
        the JSON's `notes` repeats."""
        if choice:
            self.notes.append(message)
        self.note(f"apb: note: {message}")

    def note(self, message: str) -> None:
        """An informational line on stderr; silent with --quiet."""
        if not self.quiet:
            self._separate_from_answer()
            self.console.print(f"[dim]{_escape(message)}[/]")

    def _separate_from_answer(self) -> None:
        """When stdout and stderr are one file (`> log 2>&1`) and an answer line is open, start stderr's text
        on a line of its own; the answer itself (stdout) is left as it is."""
        if self._line_open and _same_file(self.out, self.console.file):
            self.console.file.write("\n")

    # -- events ----------------------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        """Render one engine event; this is the `on_event` callback given to `run_ask`."""
        if event.kind == "token":
            self._token(event)
        elif event.kind == "phase" and event.phase == "convert":  # one line, not a bar: it happens once
            self.note(f"apb: {event.text}")
        elif event.kind in ("phase", "progress"):
            self._bar(event)
        elif event.kind == "log":
            if event.text:
                self.note(f"host {event.rank}: {event.text}")

    def _enter_question(self, index: int) -> None:
        """Close the previous answer's line and bars, and head the next answer with its question."""
        if index == self._question:
            return
        self._end_answer()
        self._stop_bars()
        self._question = index
        # streamed answers get their question on stdout (_label); with --json only stderr can name it
        if len(self.questions) > 1 and not self.quiet and not self.stream_answers and 0 <= index < len(self.questions):
            self.console.print(f"[bold]Q:[/] {_escape(_one_line(self.questions[index]))}")

    def _label(self, index: int) -> None:
        """Head answer `index` on stdout with `==> Qn: question <==` when there are several questions, after a
        blank line unless it is the first (see top)."""
        if len(self.questions) < 2 or index in self._labelled or not 0 <= index < len(self.questions):
            return
        if self._labelled:
            self.out.write("\n")
        self.out.write(f"==> Q{index + 1}: {_one_line(self.questions[index])} <==\n")
        self.out.flush()
        self._labelled.add(index)

    def _token(self, event: Event) -> None:
        if not self.stream_answers:
            return
        self._enter_question(event.question)
        if self._pause_bars_for_tokens:
            self._stop_bars()
        self._label(event.question)
        self._streaming = True
        self._streamed.add(event.question)
        if event.text:
            self.out.write(event.text)
            self.out.flush()
            self._answer_chars += len(event.text)
            self._line_open = not event.text.endswith("\n")

    def _bar(self, event: Event) -> None:
        if event.question > self._question:
            self._enter_question(event.question)
        if self.quiet:
            return
        if self._streaming and self._pause_bars_for_tokens:
            if event.phase in _STREAMING_PHASES:
                return
            # A new non-decode phase (the next question's prefill) ends this answer's line first.
            self._end_answer()
        key = (event.phase, event.rank)
        progress = self._bars()
        total = event.total if event.total > 0 else None
        if key not in self._tasks:
            # Phases report only their start (e.g. "load"); the next phase on that host means they ended.
            self._finish_open_bars(rank=event.rank)
            label = f"{event.phase:<10} {event.text or f'host {event.rank}'}"
            self._tasks[key] = progress.add_task(label, total=total, completed=event.done)
        elif event.kind == "phase" and event.done == 0:
            progress.reset(self._tasks[key], total=total)  # the phase starts again (next question)
        else:
            progress.update(self._tasks[key], total=total, completed=event.done)

    def _bars(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                # Our own stdout writes are the answer: never let rich capture them into the display.
                redirect_stdout=False,
                redirect_stderr=False,
                # Redrawing only works on a terminal; elsewhere `_stop_bars` prints the final frame once.
                disable=not self.console.is_terminal,
            )
            self._progress.start()
        return self._progress

    def _finish_open_bars(self, rank: int | None = None) -> None:
        """Mark bars without a total (phases that only report their start) as done, for one host or all."""
        if self._progress is None:
            return
        tasks = {task.id: task for task in self._progress.tasks}
        for (_, task_rank), task_id in self._tasks.items():
            task = tasks.get(task_id)
            if task is not None and task.total is None and (rank is None or task_rank == rank):
                self._progress.update(task_id, total=1, completed=1)

    def _stop_bars(self, erase: bool = False) -> None:
        """End the current set of bars; a terminal keeps their last frame, a log file gets it printed once.

        erase: leave nothing behind (the run failed and its error line should stand alone).
        """
        if self._progress is not None:
            if not erase:
                self._finish_open_bars()
            if self.console.is_terminal:
                self._progress.live.transient = erase
                self._progress.stop()
            else:
                self._progress.stop()
                if not erase and self._tasks:
                    self.console.print(self._progress.get_renderable())
            self._progress = None
            self._tasks.clear()

    def _end_answer(self) -> None:
        """Terminate the current answer with exactly one newline (an empty answer is an empty line)."""
        if self._streaming and (self._line_open or self._answer_chars == 0):
            self.out.write("\n")
            self.out.flush()
        self._streaming = False
        self._line_open = False
        self._answer_chars = 0

    # -- end of run ------------------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Stop the bars and end the last answer's line; safe to call more than once.

        failed: the run is ending with an error line; the unfinished bars are erased so that this one line
        is what the user reads.
        """
        self._end_answer()  # first: the bars' last frame must not land on the answer's line (`> log 2>&1`)
        self._stop_bars(erase=failed)

    def print_unstreamed(self, results: list[AskResult]) -> None:
        """Print answers the engine returned without streaming them (nothing was written for them yet)."""
        if not self.stream_answers:
            return
        for index, result in enumerate(results):
            if index in self._streamed:
                continue
            self._enter_question(index)
            self._label(index)
            self.out.write(result.answer if result.answer.endswith("\n") else result.answer + "\n")
            self.out.flush()
        self._question = len(results)

    def print_citations(self, results: list[AskResult]) -> None:
        """`--cite`: each answer's citations on stderr, best first (page for PDFs, else lines; share; excerpt)."""
        if self.quiet:
            return
        self._stop_bars()
        for index, result in enumerate(results):
            if result.citations is None:
                continue
            title = f"Sources (Q{index + 1})" if len(results) > 1 else "Sources"
            self.console.print(f"[bold]{title}[/]" + ("" if result.citations else ": none found"))
            for n, c in enumerate(result.citations, start=1):
                place = _escape(citation_place(c))
                self.console.print(f"  {n}. {place} ({100 * c.score:.0f}%): {_escape(_excerpt(c.text))}")

    def print_tables(self, results: list[AskResult]) -> None:
        """The timing table (per phase, one column per question) and the per-host table of each question."""
        if self.quiet or not results:
            return
        self._stop_bars()
        self.console.print(timing_table(results))
        for index, result in enumerate(results):
            if result.host_stats:
                title = f"Hosts (Q{index + 1})" if len(results) > 1 else "Hosts"
                self.console.print(host_table(result, title))
            self.console.print(f"[dim]{_escape(summary_line(result))}[/]")


def timing_table(results: list[AskResult]) -> Table:
    """Seconds per phase (rows) for each question (columns), plus prefill throughput."""
    table = Table(title="Timings", title_justify="left")
    table.add_column("phase")
    for index in range(len(results)):
        table.add_column(f"Q{index + 1} s" if len(results) > 1 else "seconds", justify="right")
    keys = list(TIMING_KEYS) + [k for r in results for k in r.timings if k not in TIMING_KEYS]
    for key in dict.fromkeys(keys):
        cells = [_seconds(r.timings.get(key)) for r in results]
        if key == "convert_s" and not any(r.timings.get(key) for r in results):
            continue  # the GGUF was already converted: no row to read
        if any(c != "-" for c in cells):
            table.add_row(key.removesuffix("_s"), *cells)
    table.add_row("prefill tok/s", *(f"{r.prefill_tokens_per_s:,.0f}" for r in results))
    return table


def host_table(result: AskResult, title: str = "Hosts") -> Table:
    """One row per host: context tokens kept, anchor, passing tokens received, prefill seconds."""
    table = Table(title=title, title_justify="left")
    for name in ("host", "tokens", "anchor", "passing recv", "prefill s"):
        table.add_column(name, justify="right")
    for stats in sorted(result.host_stats, key=lambda s: s.rank):
        table.add_row(
            str(stats.rank),
            f"{stats.block_tokens:,}",
            f"{stats.anchor_tokens:,}",
            f"{stats.passing_tokens:,}",
            _seconds(stats.prefill_s),
        )
    return table


def summary_line(result: AskResult) -> str:
    """The run's settings and token counts in one line under the tables."""
    ran = f"{result.method} on {result.hosts} host(s)"
    if result.method_requested and result.method_requested != result.method:
        why = "one host has no earlier block to pass: exact attention" if result.hosts == 1 else "chosen by apb"
        ran += f" (asked --method {result.method_requested}; {why})"
    parts = [
        f"{ran}, {result.device}, model {result.model}",
        f"prompt {result.prompt_tokens:,} tok (context {result.context_tokens:,})",
        f"generated {result.generated_tokens:,}",
        f"{result.layout} blocks, anchor {result.anchor_len}, passing {result.passing_len}"
        + (" (exact: about as cheap as compressing at this length)" if result.auto_exact else ""),
    ]
    if result.shared_prefill:
        parts.append(f"prefill {result.prefill + 1} shared by several questions")
    if result.truncated:
        parts.append(f"document truncated to fit the window: {result.dropped_tokens:,} tokens dropped, "
                     f"{result.context_tokens:,} context tokens kept")
    if result.finish_reason == "length":
        parts.append("answer cut at --max-new-tokens")
    return " | ".join(parts)


def result_dict(result: AskResult) -> dict[str, Any]:
    """The `--json` object for one answer (the keys the README documents, plus question/truncated/hosts)."""
    return {
        "question": result.question,
        "answer": result.answer,
        "model": result.model,
        "method": result.method,
        "method_requested": result.method_requested or result.method,
        "hosts": result.hosts,
        "workers": result.workers,
        "device": result.device,
        "prompt_tokens": result.prompt_tokens,
        "context_tokens": result.context_tokens,
        "generated_tokens": result.generated_tokens,
        "anchor_len": result.anchor_len,
        "passing_len": result.passing_len,
        "timings": {k: result.timings.get(k) for k in TIMING_KEYS} | dict(result.timings),
        "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "truncated": result.truncated,
        "dropped_tokens": result.dropped_tokens,
        "finish_reason": result.finish_reason,
        "auto_exact": result.auto_exact,
        "layout": result.layout,
        "prefill": result.prefill,
        "shared_prefill": result.shared_prefill,
        **({} if result.citations is None else {"citations": [citation_dict(c) for c in result.citations]}),
        "host_stats": [
            {
                "rank": s.rank,
                "block_tokens": s.block_tokens,
                "anchor_tokens": s.anchor_tokens,
                "passing_tokens": s.passing_tokens,
                "prefill_s": s.prefill_s,
            }
            for s in result.host_stats
        ],
    }


def citation_place(citation: Citation) -> str:
    """"page 3, lines 41-43" (PDF) or "lines 41-43" / "line 41" (text)."""
    lines = (f"line {citation.line_start}" if citation.line_start == citation.line_end
             else f"lines {citation.line_start}-{citation.line_end}")
    return lines if citation.page is None else f"page {citation.page}, {lines}"


def citation_dict(citation: Citation) -> dict[str, Any]:
    """One `citations` entry of the JSON: page (PDFs only), line_start, line_end, text, score."""
    return citation.as_json()


def _excerpt(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def json_payload(results: list[AskResult], notes: list[str] | tuple[str, ...] = (),
                 warnings: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """One object: the first answer's fields at the top level, and `answers` with all when there are more;
    `prefill_count` (prefills the run needed: one for several questions that shared it); `notes` (choices apb
    made on its own) and `warnings`, the lines stderr showed.

    Non-finite numbers (a rate over a zero-length phase) become null: `NaN`/`Infinity` are not JSON.
    """
    payload = result_dict(results[0])
    if len(results) > 1:
        payload["answers"] = [result_dict(r) for r in results]
    payload["prefill_count"] = len({r.prefill for r in results})
    payload["notes"], payload["warnings"] = list(notes), list(warnings)
    return _finite(payload)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _one_line(question: str) -> str:
    """A header is one line, whatever breaks the question holds (U+0085 and the other line breaks included)."""
    return " ".join(question.splitlines())


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _escape(text: str) -> str:
    """Document text and file names may contain `[...]`, which rich would read as markup."""
    from rich.markup import escape

    return escape(text)


def _same_file(a: Any, b: Any) -> bool:
    """True when two streams write to the same file (`> log 2>&1`), or are the same object."""
    if a is b:
        return True
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
