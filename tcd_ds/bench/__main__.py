"""The tcd-ds benchmark suite: `python -m tcd_ds.bench [--quick] [--only ...] [--out ...] [--markdown ...]`.

Sections (one module each in tcd_ds/bench/):
- relation: relation loss forward+backward, naive L x L vs Gram fast path, time and peak memory;
- moe: one MoE layer forward+backward per backend (torch, grouped, deepspeed, megablocks) vs a dense FFN;
- step: one training step of vanilla / moe / tcd at the tiny and small recipes, tokens/s and MFU;
- scaling: the real trainer on 1 vs 2 CPU ranks (expert parallelism), tokens/s from summary.json;
- peer: tcd-ds vanilla vs transformers.BertForMaskedLM, one training step each;
- finetune: fine-tuning examples/s (tiny and small, vanilla and MoE, MRPC and SST-2) per batching;
- trainer: the real trainer's three modes on 2 ranks (small), tokens/s, MFU vs the fp32/bf16 peaks,
  and where a step's time goes (the trainer's per-phase clock).

Every section compares its variants inside one process run (scaling: one launch per variant),
interleaved, and reports medians over repeats after warm-up. `--quick` runs tiny sizes with few
repeats (CI); the default is the full run, by hand. Results: JSON (`--out`) and a markdown report
(`--markdown`) with the tables, the targets, the exact commands and the machine. `--merge` re-runs
some sections and keeps the others from the existing `--out` JSON (each section says when it ran).
"""
from __future__ import annotations

import importlib
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from tcd_ds.bench.common import fmt, loadavg, machine_info, md_table
from tcd_ds.cli import Parser, fail, print_error

SECTIONS = ("relation", "moe", "step", "scaling", "peer", "finetune", "trainer")


def run_suite(only: Sequence[str] = SECTIONS, quick: bool = False, threads: int | None = None,
              step_recipes: Sequence[str] | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the chosen sections in this process; returns the JSON-able result."""
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    old_threads = torch.get_num_threads()
    if threads is None and quick:
        threads = 1  # CI smoke run: steadier and faster on a loaded box than oversubscribed OpenMP threads
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(only, quick, step_recipes, command)
    finally:
        torch.set_num_threads(old_threads)


def _run(only: Sequence[str], quick: bool, step_recipes: Sequence[str] | None, command: str | None
         ) -> dict[str, Any]:
    result: dict[str, Any] = {
        "suite": "tcd_ds.bench", "quick": quick, "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "sections": {}, "targets": [],
    }
    t_start = time.perf_counter()
    early = None
    if quick and "scaling" in only:  # quick: the trainer launches run while the other sections do
        from tcd_ds.bench.scaling import Launches

        early = Launches(quick=True)
    for name in [s for s in SECTIONS if s in only]:
        module = importlib.import_module(f"tcd_ds.bench.{name}")
        load_before, t0 = loadavg(), time.perf_counter()
        kwargs: dict[str, Any] = {"recipes": step_recipes} if name == "step" and step_recipes else {}
        if name == "scaling" and early is not None:
            kwargs["launches"] = early
        section = module.section(quick=quick, **kwargs)
        section["wall_s"] = time.perf_counter() - t0
        section["started"] = datetime.fromtimestamp(time.time() - section["wall_s"], timezone.utc).isoformat(
            timespec="seconds")
        section["cpu"] = _cpu(result["machine"])
        section["loadavg_before"], section["loadavg_after"] = load_before, loadavg()
        result["sections"][name] = section
        result["targets"] += [dict(t, section=name) for t in section.get("targets", [])]
    result["wall_s"] = time.perf_counter() - t_start
    result["machine"]["loadavg_end"] = loadavg()
    return result


def merge(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new`, plus the sections of `previous` it did not run (in suite order); targets follow the sections."""
    sections = {**previous.get("sections", {}), **new["sections"]}
    sections = {k: sections[k] for k in SECTIONS if k in sections}
    for name, sec in sections.items():
        if name not in new["sections"]:
            sec.setdefault("started", previous.get("started"))
            sec.setdefault("cpu", _cpu(previous.get("machine", {})))
    targets = [dict(t, section=name) for name, sec in sections.items() for t in sec.get("targets", [])]
    return {**new, "sections": sections, "targets": targets,
            "wall_s": sum(sec.get("wall_s") or 0 for sec in sections.values())}


def _cpu(m: dict[str, Any]) -> str:
    return f"{m.get('cpu_model')} ({' '.join(m.get('isa') or [])}), {m.get('cpu_count')} CPUs"


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become None (they should not occur; the tests check)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        met = "-" if t["met"] is None else ("met" if t["met"] else "NOT met")
        rows.append([t["target"], t["value"], t.get("value_min"), f"{t['op']} {fmt(t['threshold'])}", met])
    return md_table(["target", "measured (medians)", "(fastest repeats)", "wanted", "on the medians"], rows,
                    align="lrrrl")


def markdown(result: dict[str, Any], bounds: dict[str, str] | None = None) -> str:
    """The report: machine and load, the commands, the targets, then one table per section."""
    m = result["machine"]
    mode = "quick (CI smoke run: tiny sizes, numbers not meaningful)" if result["quick"] else "full"
    lines = [
        "# tcd-ds performance",
        "",
        "Generated by `python -m tcd_ds.bench` (tcd_ds/bench/); do not edit by hand, re-run the suite.",
        "",
        f"- mode: {mode}; started {result['started']}, {result['wall_s']:.0f} s in all",
        f"- command: `{result['command']}`" if result.get("command") else "- command: (in-process call)",
        f"- machine: {m['cpu_model']} (family {m.get('cpu_family')} model {m.get('cpu_model_number')}"
        + (", virtual machine" if m.get("hypervisor") else "") + f", {' '.join(m.get('isa') or [])}), "
        f"{m['cpu_count']} logical CPUs ({m['cpus_usable']} usable), {m['platform']}",
        f"- software: Python {m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}, transformers "
        f"{m['transformers']}; torch intra-op threads {m['torch_threads']}"
        + (f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"),
        f"- load average (1/5/15 min) at the start {m['loadavg_1_5_15']}, at the end {m.get('loadavg_end')}"
        + (f" on {m['cpu_count']} CPUs: the machine was shared with other jobs during the measurements, so "
           "absolute times are noisy and run-to-run differences of 5-10 % are common."
           if max((m["loadavg_1_5_15"] or [0])[:1] + (m.get("loadavg_end") or [0])[:1]) > 0.5 * (m["cpu_count"] or 1)
           else " (a quiet machine).")
        + " Every comparison is between variants timed in the same process, interleaved round-robin, as "
        "medians over repeats after warm-up (min also shown); the load average of each section is given.",
        "",
        f"Re-run this report: `{result['command']}`" if result.get("command") else "",
        "(one section: `--only relation`, or moe, step, scaling, peer, finetune, trainer; `--merge` keeps the other "
        "sections of `--out`; `--quick` is the CI smoke run of tests/test_bench.py; `--step-recipes "
        "tiny,small,base` adds base to the step section).",
        "",
        "## Targets",
        "",
        targets_table(result["targets"]) if result["targets"] else "(no targets evaluated in this run)",
        "",
    ]
    missed = [t for t in result["targets"] if t["met"] is False and t.get("bound")]
    if missed or bounds:
        lines += ["What bounds the targets not met:", ""]
        lines += [f"- {t['target']}: {t['bound']}" for t in missed]
        lines += [f"- {k}: {v}" for k, v in (bounds or {}).items()]
        lines.append("")
    for name, sec in result["sections"].items():
        when = f"run {sec['started']}; " if sec.get("started") else ""
        if sec.get("cpu") and sec["cpu"] != _cpu(m):
            when += f"on {sec['cpu']}; "
        lines += [f"## {sec['title']}", "", f"`--only {name}`; {when}{sec['wall_s']:.0f} s; load average "
                  f"{sec['loadavg_before']} -> {sec['loadavg_after']}", "", sec["table"], ""]
        lines += [f"- {n}" for n in sec.get("notes", [])]
        lines.append("")
    return "\n".join(lines)


def portable(text: str) -> str:
    """`text` without this machine's absolute paths: the interpreter and the deepspeed launcher by
    name, the data beside the repo as ../shared, the repo itself as the working directory, temporary
    run dirs as <tmp> (the committed report names no machine's paths)."""
    import re
    import shutil
    import sys

    from tcd_ds.resources import ROOT

    for path, name in ((shutil.which("deepspeed"), "deepspeed"), (sys.executable, "python"),
                       (str(ROOT.parent / "shared"), "../shared"), (str(ROOT) + "/", "")):
        if path:
            text = text.replace(path, name)
    return re.sub(r"/tmp/tcd-bench-[\w.-]+", "<tmp>", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Bad input is one `error:` line and exit status 2 (tcd_ds/cli.py), before anything runs."""
    p = Parser(prog="python -m tcd_ds.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (CI; well under a minute)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown report here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default; 1 with --quick)")
    p.add_argument("--step-recipes", default=None,
                   help="recipes of the step section (default tiny,small; base runs with 8 experts, micro-batch 8)")
    p.add_argument("--merge", action="store_true",
                   help="keep the sections of the existing --out JSON that this run does not re-run")
    p.add_argument("--bounds", type=Path, default=None,
                   help="JSON {target: explanation} added under the targets table of the markdown report")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
    previous = None
    if args.merge:
        if not args.out or not args.out.is_file():
            fail("--merge needs --out naming an existing results JSON")
        try:
            previous = json.loads(args.out.read_text())
        except json.JSONDecodeError as err:
            fail(f"--merge: {args.out} is not JSON: {err}")
    bounds = None
    if args.bounds:  # read before the suite runs, not after it
        try:
            bounds = json.loads(args.bounds.read_text())
        except (OSError, json.JSONDecodeError) as err:
            fail(f"--bounds {args.bounds}: {err}")
        if not isinstance(bounds, dict):
            fail(f"--bounds {args.bounds}: expected a JSON object {{target: explanation}}")
    command = "python -m tcd_ds.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        result = run_suite(only, quick=args.quick, threads=args.threads,
                           step_recipes=args.step_recipes.split(",") if args.step_recipes else None,
                           command=command.strip())
    except ValueError as err:
        print_error(err)
        return 2
    if previous is not None:
        result = merge(previous, result)
    result = json.loads(portable(json.dumps(_clean(result))))
    report = markdown(result, bounds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
