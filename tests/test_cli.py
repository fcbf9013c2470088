"""One convention for the commands (tcd_ds/cli.py): bad input is one `error:` line on stderr and
exit status 2, never a traceback; `--help` shows the defaults. Cheap subprocesses, no training."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer_utils import REPO


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=env)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused command (library log lines such as DeepSpeed's accelerator
    notice are not ours and are left out)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if "real_accelerator.py" not in line]
    assert len(ours) == 1 and ours[0].startswith("error: "), proc.stderr
    return ours[0]


@pytest.mark.multiproc
@pytest.mark.parametrize("args,message", [
    # the README's example with `base` (its backend keeps every expert on every rank)
    (["--config", "base", "--world", "32", "model.moe.ep_size=8"], "model.moe.ep_size=8 needs model.moe.backend"),
    (["--config", "tiny", "--world", "2", "trian.max_steps=3"],
     "unknown config key 'trian.max_steps'; did you mean 'train.max_steps'?"),
    (["--config", "nosuch", "--world", "2"], "recipe 'nosuch' is neither a file nor one of"),
    (["--config", "large", "--world", "12"], "model.moe.ep_size=8 does not divide --world 12"),
    (["--config", "tiny", "--world", "0"], "--world must be >= 1"),
    (["--world", "2"], "the following arguments are required: --config"),
    (["--config", "tiny", "--world", "2", "--dtype", "fp8"], "argument --dtype: invalid choice"),
])
def test_memory_bad_input_is_one_line(args, message):
    assert message in error_line(run("tcd_ds.memory", *args))


@pytest.mark.multiproc
def test_memory_readme_example_still_prints_the_plan():
    proc = run("tcd_ds.memory", "--config", "large", "--world", "32", "model.moe.ep_size=8")
    assert proc.returncode == 0 and proc.stdout.startswith("memory plan per rank (GiB):"), proc.stderr


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("args,message", [
    (["--threads", "x"], "argument --threads: invalid int value: 'x'"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--only", "nope"], "unknown section(s) nope"),
    (["--bounds", "/nonexistent/bounds.json"], "--bounds /nonexistent/bounds.json"),  # before the suite runs
])
def test_bench_bad_input_is_one_line(args, message):
    # --quick --only relation: if the check were missing, the suite would run a few seconds, not the full one
    assert message in error_line(run("tcd_ds.bench", "--quick", "--only", "relation", *args))


@pytest.mark.slow
@pytest.mark.multiproc
def test_finetune_argument_errors_are_one_line():
    line = error_line(run("tcd_ds.finetune", "--model", "m", "--task", "MRPC", "--glue-dir", "g", "--epochs", "0"))
    assert "argument --epochs: 0 must be >= 1" in line


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("module,shown", [
    ("tcd_ds.memory", ["ZeRO stage (default: 2)", "training dtype (default: bf16)"]),
    ("tcd_ds.finetune", ["(default: 3)", "examples per step (default: 32)", "(default: 128)",
                         "AdamW weight decay (default: 0.01)", "(default: torch)", "(default: 30)"]),
    ("tcd_ds.bench", ["(default: relation,moe,step,scaling,peer,finetune,trainer)"]),
])
def test_help_shows_the_defaults(module, shown):
    proc = run(module, "--help")
    assert proc.returncode == 0, proc.stderr
    text_out = " ".join(proc.stdout.split())  # argparse wraps lines at the terminal width
    for text in shown:
        assert text in text_out, (text, proc.stdout)
    assert "object at 0x" not in text_out and "MISSING" not in text_out, proc.stdout  # a required flag's help


def test_defaults_formatter_leaves_what_has_no_default():
    from tcd_ds.cli import Parser

    p = Parser(prog="x")
    p.add_argument("--out", default=None, help="output dir")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--n", type=int, default=0, help="0 = all")
    p.add_argument("--lrs", default=[2e-5, 5e-5], help="learning rates")
    p.add_argument("--said", default=1, help="already says (default 1)")
    text = " ".join(p.format_help().split())
    assert "output dir --flag" in text and "a switch --n" in text  # no "(default: None/False)"
    assert "0 = all (default: 0)" in text and "learning rates (default: 2e-05,5e-05)" in text
    assert "already says (default 1) " in text + " " and "(default 1) (default" not in text


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("module, argv, message", [
    ("tcd_ds.train", ["--config", "tiny"], "error: the following arguments are required: --deepspeed_config"),
    ("tcd_ds.train", ["--config", "tiny", "--mode", "bogus", "--deepspeed_config", "x.json"], "error: argument --mode"),
    ("tcd_ds.analyze", ["m"], "error: the following arguments are required: --teacher, --corpus"),
    ("tcd_ds.experiments", ["tiny", "--bogus"], "error: unrecognized arguments: --bogus"),
    ("tcd_ds.checkpoint", [], "error: the following arguments are required: source, out"),
    ("tcd_ds.checkpoint", ["/nonexistent/run", "/tmp/x"], "error: /nonexistent/run does not exist"),
])
def test_more_clis_answer_bad_input_with_one_line(module, argv, message):
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_one_duration_format_for_progress_lines_and_reports():
    from tcd_ds.cli import format_duration

    assert [format_duration(s) for s in (0, 59.4, 59.6, 61, 3599.4, 3600, 3723, 90061, -5)] == [
        "0m00s", "0m59s", "1m00s", "1m01s", "59m59s", "1h00m00s", "1h02m03s", "25h01m01s", "0m00s"]
