"""The ``gpttrace`` command: trace the reference model, show and convert trace files.

    gpttrace run [--depth 4] [--iterations 3] [--json PATH] [--markdown PATH]
    gpttrace show TRACE            (JSON or seed-format Markdown) -> Markdown on stdout
    gpttrace convert IN OUT        between JSON and Markdown, by OUT's suffix
    gpttrace diff GOLDEN OBTAINED  the golden-comparison report (exit 1 when they differ)
    gpttrace check TRACE           anomalies with diagnoses (exit 1 when any is an error)

Exit codes: 0 ok, 1 the traces differ (diff) or an anomaly is an error (check), 2 usage or input
error (one line on stderr), 130 interrupted (Ctrl-C; one line on stderr, no file half-written),
141 stdout closed early (``gpttrace diff A B | head``; nothing printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .errors import CaptureError, GptTraceError

if TYPE_CHECKING:
    from .anomalies import Anomaly
    from .trace import Trace

EXIT_OK, EXIT_DIFFER, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + 2  # as a shell reports a command killed by SIGINT
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a command killed by SIGPIPE


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1


def _seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not 0 <= n < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64 - 1 (the range of torch.manual_seed), "
                                         f"got {n}")
    return n


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def cmd_run(args: argparse.Namespace) -> int:
    if args.json and args.markdown and _same_file(args.json, args.markdown):
        raise SystemExit(_usage_error(f"run: --json and --markdown are both {args.markdown}: "
                                      f"give the JSON trace and the Markdown report different files"))
    import torch

    from reference_model import GPT, GPTConfig, optimizers, synthetic_batches

    from . import markdown
    from .traceio import check_writable, write_trace
    from .tracer import trace_training

    try:
        config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.sequence_len)
    except ValueError as exc:
        raise SystemExit(_usage_error(f"run: {exc}")) from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(_usage_error(f"run: --device {args.device}: CUDA is not available on this machine"))
    _check_device(args.device)
    for option in ("json", "markdown"):
        if getattr(args, option):
            try:
                check_writable(getattr(args, option), f"run: --{option}")
            except OSError as exc:
                raise SystemExit(_usage_error(exc.strerror or str(exc))) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model = GPT(config, seed=args.seed).to(args.device)
    batches = synthetic_batches(config, seed=args.seed, device=args.device)
    opts = [] if args.no_step else optimizers(model)
    try:
        trace = trace_training(model, batches, opts, iterations=args.iterations, micro_steps=args.micro_steps,
                               stages=args.stages or None, granularity=args.granularity, ops=args.ops)
    except CaptureError as exc:
        raise SystemExit(_usage_error(f"run: {exc}")) from None
    options = {"all_iterations": args.all_iterations, "generated": _now(), "anomalies": _anomaly_section(trace)}
    if args.json:
        write_trace(args.json, trace, "json")
    if args.markdown:
        write_trace(args.markdown, trace, "markdown", **options)
    if not args.json and not args.markdown:
        sys.stdout.write(markdown.render(trace, **options))
    return EXIT_OK


def _same_file(a: str, b: str) -> bool:
    from pathlib import Path

    return Path(a).resolve() == Path(b).resolve()


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(_usage_error(f"run: --device {name}: {exc}")) from None
    if device.type == "meta":
        raise SystemExit(_usage_error(f"run: --device {name}: meta tensors hold no values to take statistics of"))
    try:
        torch.ones(2, device=device).sum()
    except Exception as exc:  # an unbuilt backend, a missing driver: say so in one line
        raise SystemExit(_usage_error(f"run: --device {name}: this torch cannot use it ({exc})")) from None


def cmd_show(args: argparse.Namespace) -> int:
    from . import markdown
    from .traceio import read_trace

    trace = read_trace(args.trace)
    sys.stdout.write(markdown.render(trace, all_iterations=args.all_iterations, anomalies=_anomaly_section(trace)))
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .traceio import format_for, read_trace, write_trace

    trace = read_trace(args.input)
    fmt = args.to or format_for(args.output)
    write_trace(args.output, trace, fmt, **({"all_iterations": True} if fmt == "markdown" else {}))
    return EXIT_OK


def _anomaly_section(trace: Trace) -> list[Anomaly]:
    from .anomalies import detect

    return detect(trace)


def cmd_check(args: argparse.Namespace) -> int:
    from .anomalies import INFO, WARNING, Thresholds, check_rules, detect, errors, parse_thresholds
    from .report import anomaly_lines
    from .traceio import read_trace

    try:
        check_rules(args.allow or [])
    except ValueError as exc:
        raise SystemExit(_usage_error(f"check: --allow: {exc}")) from None
    try:
        thresholds = Thresholds().updated(parse_thresholds(args.threshold or []))
    except ValueError as exc:
        raise SystemExit(_usage_error(f"check: --threshold: {exc}")) from None
    trace = read_trace(args.trace)
    found = detect(trace, thresholds, allow=args.allow or [])
    print(f"{args.trace}: {len(errors(found))} errors, "
          f"{sum(a.severity == WARNING for a in found)} warnings, {sum(a.severity == INFO for a in found)} infos")
    print("\n".join(anomaly_lines(found, include_info=not args.quiet)))
    return EXIT_DIFFER if errors(found) else EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from .compare import AUTO, check_same_config, compare, get_profile, overrides_from_lines, resolve_profile
    from .report import render_comparison
    from .traceio import read_trace

    try:
        overrides = overrides_from_lines(args.tolerance or [])
        if args.profile != AUTO:
            get_profile(args.profile)
    except ValueError as exc:
        raise SystemExit(_usage_error(f"diff: {exc}")) from None
    golden, obtained = read_trace(args.golden), read_trace(args.obtained)
    config_diff = check_same_config(golden, obtained)
    if config_diff:
        return _usage_error(f"diff: {args.golden} and {args.obtained} are traces of different model configs "
                            f"({'; '.join(config_diff)}); compare traces of one config")
    try:
        profile = resolve_profile(args.profile, golden, overrides)
    except ValueError as exc:
        return _usage_error(f"diff: {args.golden}: {exc}")
    result = compare(golden, obtained, profile)
    lines = render_comparison(result, golden_name=args.golden, obtained_name=None,
                              max_rows=args.max_rows if args.max_rows > 0 else len(result.mismatches),
                              more_hint="--max-rows 0 lists them all")
    print("\n".join(lines))
    return EXIT_OK if result.ok else EXIT_DIFFER


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Record each test's golden again with a freshly measured band: pytest --gpt-trace-recalibrate."""
    import subprocess

    command = [sys.executable, "-m", "pytest", *args.tests, "--gpt-trace-recalibrate", "-p", "no:cacheprovider"]
    if args.dithers is not None:
        command += ["-o", f"gpt_trace_dithers={args.dithers}"]
    print("$ " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpttrace", description="Trace, show and convert GPT numerics traces.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="trace the reference model and write its report",
                         description="Train the reference GPT for a few instrumented iterations and write the trace.")
    run.add_argument("--depth", type=_positive, default=4, help="layers (width 64 per layer; default 4)")
    run.add_argument("--sequence-len", type=_positive, default=1024, help="tokens per sequence (default 1024)")
    run.add_argument("--vocab-size", type=_positive, default=65536, help="vocabulary size (default 65536)")
    run.add_argument("--iterations", type=_positive, default=3, help="traced forward/backward passes (default 3)")
    run.add_argument("--micro-steps", type=_positive, default=1,
                     help="gradient-accumulation micro-steps per optimizer step (default 1)")
    run.add_argument("--no-step", action="store_true", help="never step the optimizer (as the seed trace did)")
    run.add_argument("--seed", type=_seed, default=42, help="init and data seed, 0 to 2**64 - 1 (default 42)")
    run.add_argument("--device", default="cpu", help="torch device (default cpu)")
    run.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    run.add_argument("--stages", action="append", metavar="GLOB",
                     help="stage glob (repeatable): plain keeps, +GLOB adds any module, !GLOB drops")
    run.add_argument("--granularity", choices=("auto", "taps", "modules", "ops"), default="auto",
                     help="what a stage is: the model's taps (auto), every leaf module, or leaf modules plus "
                          "functional ops")
    run.add_argument("--ops", action="append", metavar="OP",
                     help="op-list change for --granularity ops (repeatable): NAME replaces the list, +NAME adds, "
                          "!NAME drops")
    run.add_argument("--json", metavar="PATH", help="write the JSON trace here")
    run.add_argument("--markdown", metavar="PATH", help="write the Markdown report here")
    run.add_argument("--all-iterations", action="store_true", help="render every iteration in full")
    run.set_defaults(func=cmd_run)

    show = sub.add_parser("show", help="render a trace file (JSON or Markdown) as Markdown")
    show.add_argument("trace", help="trace file")
    show.add_argument("--all-iterations", action="store_true", help="render every iteration in full")
    show.set_defaults(func=cmd_show)

    convert = sub.add_parser("convert", help="convert a trace between JSON and Markdown")
    convert.add_argument("input", help="trace file to read (JSON or Markdown)")
    convert.add_argument("output", help="file to write; the format follows its suffix (.json, .md)")
    convert.add_argument("--to", choices=("json", "markdown"), help="output format, overriding the suffix")
    convert.set_defaults(func=cmd_convert)

    diff = sub.add_parser("diff", help="compare two traces under a tolerance profile",
                          description="Compare OBTAINED with GOLDEN (either JSON or Markdown); exit 1 when they differ.")
    diff.add_argument("golden", help="the expected trace")
    diff.add_argument("obtained", help="the trace to check")
    diff.add_argument("--profile", default="auto",
                      help="tolerance profile: auto (default: calibrated when GOLDEN has a noise band, else exact), "
                           "calibrated, exact or statistical")
    diff.add_argument("--max-rows", type=int, default=0, help="rows of the table (default 0: every mismatch)")
    diff.add_argument("--tolerance", action="append", metavar="LINE",
                      help="override, repeatable: 'STAGE_GLOB STAT_GLOB atol=X rtol=Y' or 'STAGE_GLOB STAT_GLOB skip'")
    diff.set_defaults(func=cmd_diff)

    calibrate = sub.add_parser(
        "calibrate", help="record goldens again with a measured noise band",
        description="Replay each test under platform variants (ISA caps, thread count, dithered kernels) and "
                    "write its golden with the band: pytest TESTS --gpt-trace-recalibrate.")
    calibrate.add_argument("tests", nargs="+", metavar="TEST", help="pytest node ids or files")
    calibrate.add_argument("--dithers", type=int, default=None, help="dithered replays per test (default 2)")
    calibrate.set_defaults(func=cmd_calibrate)

    check = sub.add_parser("check", help="report anomalies with diagnoses (exit 1 on any error)",
                           description="Run the anomaly rules over a trace (JSON or Markdown).")
    check.add_argument("trace", help="trace file")
    check.add_argument("--allow", action="append", metavar="RULE", help="downgrade this rule's errors to infos (repeatable)")
    check.add_argument("--threshold", action="append", metavar="NAME=VALUE", help="override a threshold (repeatable)")
    check.add_argument("-q", "--quiet", action="store_true", help="leave out the infos")
    check.set_defaults(func=cmd_check)
    return parser


def _usage_error(message: str) -> int:
    first = str(message).splitlines()[0] if str(message) else "error"
    print(f"gpttrace: error: {first}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the flush at exit
        return code
    except KeyboardInterrupt:  # Ctrl-C: the writes are atomic, so no output file is left half-written
        print("gpttrace: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except GptTraceError as exc:
        return _usage_error(str(exc))
    except BrokenPipeError:  # the reader of stdout went away: end quietly
        return _exit_on_broken_pipe()
    except OSError as exc:
        return _usage_error(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _exit_on_broken_pipe() -> int:
    """The reader went away (``gpttrace diff A B | head``): stop quietly, as a shell tool does.

    Python flushes stdout again at exit; pointing it at devnull keeps that flush from failing a
    second time (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
