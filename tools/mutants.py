"""Mutation check: does the test suite catch a broken property?

    make mutants                                   # every mutation in tools/mutations.toml
    python tools/mutants.py --only accum-not-averaged resume-ignored
    python tools/mutants.py --check                # patterns only: is any mutation stale? (seconds)

Each mutation in ``tools/mutations.toml`` names one claim of the code, a file, an exact
``search`` text and its ``replace``ment (a realistic bug), and the tests meant to catch it. The
tracked tree is copied once to a temporary folder; for each mutation the file is edited there,
the named tests run against that copy (``PYTHONPATH`` points at it, so subprocesses such as
recipe runs and ``accelerate launch`` see the mutated code too), and the file is restored.

Verdicts: ``caught`` (a named test failed), ``NOT CAUGHT`` (they all passed: the suite misses a
broken property), ``stale`` (the search text is not in the file exactly once: update the
mutation to the code as it is now, never delete it to make the table green), ``error`` (pytest
collected nothing or could not run: fix the test names), ``timeout`` (the tests hung: make them
fail instead). The unmutated tests run first; if they
fail, nothing else is judged. The exit status is 0 only when every mutation is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = ROOT / "tools" / "mutations.toml"
PYTEST_FAILED = 1  # pytest's exit code when tests ran and at least one failed


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str  # the property the mutation breaks
    file: str  # relative to the repository root
    search: str
    replace: str
    tests: tuple[str, ...]  # pytest node ids (a test function covers all its parameters)


def load_mutations(path: Path = MUTATIONS) -> list[Mutation]:
    with open(path, "rb") as fh:
        entries = tomllib.load(fh)["mutation"]
    mutations = [Mutation(e["name"], e["claim"], e["file"], e["search"], e["replace"], tuple(e["tests"]))
                 for e in entries]
    names = [m.name for m in mutations]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SystemExit(f"{path}: mutation names used twice: {duplicated}")
    return mutations


def stale_reason(mutation: Mutation, root: Path = ROOT) -> str | None:
    """Why the mutation no longer applies to the code under ``root``, or None if it does."""
    path = root / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    count = path.read_text().count(mutation.search)
    if count != 1:
        return f"search text found {count} times in {mutation.file} (needs exactly 1)"
    if mutation.search == mutation.replace:
        return "replace equals search: nothing is mutated"
    return None


def copy_tree(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout, as they are on disk."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def pytest_env(copy: Path, threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}


def run_tests(copy: Path, tests: tuple[str, ...], env: dict, timeout: float) -> tuple[int, str]:
    """(pytest's exit code, its summary line and the names of failed tests)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends everything it started
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -1, f"timed out after {timeout:.0f} s"
    lines = out.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAILED ")]
    return proc.returncode, "; ".join([lines[-1] if lines else "", *failed])


def check_imports_from(copy: Path, env: dict) -> None:
    """The copy, not the editable install in the checkout, must be what the tests import."""
    found = subprocess.run([sys.executable, "-c", "import ssl_vit, eval; print(ssl_vit.__file__); print(eval.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in found):
        raise SystemExit(f"the tests would import {found}, not the mutated copy in {copy}")


def judge(mutation: Mutation, copy: Path, env: dict, timeout: float) -> tuple[str, str]:
    reason = stale_reason(mutation, copy)
    if reason:
        return "stale", reason
    path = copy / mutation.file
    original = path.read_text()
    path.write_text(original.replace(mutation.search, mutation.replace))
    try:
        code, last = run_tests(copy, mutation.tests, env, timeout)
    finally:
        path.write_text(original)
    if code == 0:
        return "NOT CAUGHT", last
    if code == PYTEST_FAILED:
        return "caught", last
    if code == -1:
        return "timeout", last
    return "error", f"pytest exit {code}: {last}"


def print_table(rows: list[dict]) -> None:
    width = max(len(r["name"]) for r in rows)
    print(f"\n{'mutation':<{width}}  {'verdict':<10}  {'s':>5}  tests")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['verdict']:<10}  {r['seconds']:5.0f}  {', '.join(r['tests'])}")
        if r["verdict"] != "caught":
            print(f"{'':<{width}}  -> {r['detail']}")
    verdicts = [r["verdict"] for r in rows]
    print("\n" + ", ".join(f"{verdicts.count(v)} {v}" for v in ("caught", "NOT CAUGHT", "stale", "error", "timeout")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--check", action="store_true", help="only check that every mutation still applies")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the tests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    mutations = load_mutations()
    if args.only:
        unknown = set(args.only) - {m.name for m in mutations}
        if unknown:
            parser.error(f"unknown mutations {sorted(unknown)}; see {MUTATIONS.relative_to(ROOT)}")
        mutations = [m for m in mutations if m.name in args.only]
    if args.check:
        stale = [(m.name, stale_reason(m)) for m in mutations if stale_reason(m)]
        for name, reason in stale:
            print(f"stale: {name}: {reason}")
        print(f"{len(mutations) - len(stale)} of {len(mutations)} mutations apply")
        return 1 if stale else 0

    with tempfile.TemporaryDirectory(prefix="ssl_vit-mutants-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        env = pytest_env(copy, args.threads)
        check_imports_from(copy, env)
        tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        print(f"unmutated: {len(tests)} tests ...", flush=True)
        code, last = run_tests(copy, tests, env, args.timeout * 2)
        if code != 0:
            print(f"the unmutated tests do not pass ({last}); fix them first")
            return 2
        rows = []
        for i, m in enumerate(mutations, 1):
            print(f"[{i}/{len(mutations)}] {m.name} ...", flush=True)
            start = time.perf_counter()
            verdict, detail = judge(m, copy, env, args.timeout)
            rows.append({"name": m.name, "claim": m.claim, "file": m.file, "tests": list(m.tests),
                         "verdict": verdict, "detail": detail, "seconds": time.perf_counter() - start})
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["verdict"] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
