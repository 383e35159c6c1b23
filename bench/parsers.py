"""Time bound of the text parsers that read model output and observations, on adversarial 10^5-character inputs.

    python bench/parsers.py [--size 100000] [--out bench/results]

Each parser runs on every input of its list (deep nesting, unbalanced braces, many starts, long numbers, many
``Q:`` markers, ...); a parser's time is its slowest input. The goal is under a second each on one CPU core.
Writes ``<out>/parsers.json`` (with the git commit); the last line printed is
``parsers: extract_json_s=<x> parse_qa_text_s=<x> observation_delta_s=<x>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_runs import provenance  # noqa: E402

from datamodules.early_experience import observation_delta  # noqa: E402
from datamodules.instructions import parse_qa_text  # noqa: E402
from tuning.backends import extract_json  # noqa: E402


def json_inputs(n: int) -> dict[str, str]:
    """Texts without a usable JSON object (or with one only at the very end)."""
    return {
        "open_braces": "{" * n, "close_braces": "}" * n, "open_brackets": "[" * n,
        "nested_keys": '{"a":' * (n // 5), "nested_strings": '{"a":"' * (n // 6),
        "unparsable_spans": "{[}" * (n // 3), "long_integer": '{"a": ' + "9" * n + "}",
        "wide_nesting": ('{"a":[' + "0," * 20) * (n // 46), "backslashes": "{" + "\\" * n,
        "object_at_end": "{" * n + '{"ok": 1}',
    }


def qa_inputs(n: int) -> dict[str, str]:
    return {"markers": "Q:" * (n // 2), "no_question_mark": "Q: x" * (n // 4),
            "question_marks": "Q: " + "? " * (n // 2), "pairs": "Q: a? A: b " * (n // 11),
            "lines": "Q: x? A: y\n" * (n // 11)}


def delta_inputs(n: int) -> dict[str, tuple[str, str]]:
    return {"deep": ("{}", '{"a":' * (n // 10) + "1" + "}" * (n // 10)),
            "long_integer": ('{"a": 1}', '{"a": ' + "9" * n + "}"),
            "brackets": ("[" * n, "{" * n), "lines": ("x\n" * (n // 2), "y\n" * (n // 2)),
            "fields": (json.dumps({f"k{i}": i for i in range(n // 12)}),
                       json.dumps({f"k{i}": i + 1 for i in range(n // 12)}))}


def slowest(parser, inputs: dict) -> tuple[float, dict[str, float]]:
    times = {}
    for name, value in inputs.items():
        args = value if isinstance(value, tuple) else (value,)
        started = time.perf_counter()
        try:
            parser(*args)
        except ValueError:  # extract_json's documented "no object"
            pass
        times[name] = round(time.perf_counter() - started, 4)
    return max(times.values()), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="characters per input")
    parser.add_argument("--out", default=str(REPO / "bench/results"), help="folder of parsers.json")
    args = parser.parse_args()
    results = {}
    for name, function, inputs in (("extract_json", extract_json, json_inputs(args.size)),
                                   ("parse_qa_text", parse_qa_text, qa_inputs(args.size)),
                                   ("observation_delta", observation_delta, delta_inputs(args.size))):
        worst, times = slowest(function, inputs)
        results[name] = {"slowest_s": worst, "inputs": times}
        print(f"{name}: " + " ".join(f"{k}={v}" for k, v in times.items()))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "parsers.json").write_text(json.dumps(
        {"size": args.size, "results": results, "provenance": provenance(())}, indent=2) + "\n")
    print("parsers: " + " ".join(f"{name}_s={r['slowest_s']:.3f}" for name, r in results.items()))


if __name__ == "__main__":
    main()
