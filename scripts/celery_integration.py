"""Run Celery's own integration suite as a drop-in check of celery-dedup.

usage: scripts/celery-integration [--mode plain|while_executing|until_executed|all]
                                  [-k EXPR] [--timeout SECONDS] [--max-reruns N]
                                  [--keep] [--json] [--install-deps] [--quiet]
                                  [--log-dir DIR] [--baseline FILE]

What it does:

1. Downloads the sdist of the installed Celery release
   (``pip download --no-binary :all: --no-deps celery==<celery.__version__>``)
   and unpacks it in a temporary folder, outside the repository. Nothing of
   it is copied into the repository, and no file of it is changed.
2. Starts a private ``redis-server`` on a free loopback port (no
   persistence, its own temporary folder); it is the suite's broker and
   result backend (``TEST_BROKER``, ``TEST_BACKEND``) and the Redis the
   tests talk to directly (``REDIS_HOST``, ``REDIS_PORT``). It is stopped at
   the end, on Ctrl-C and on errors too.
3. Runs ``t/integration/test_tasks.py`` and ``t/integration/test_canvas.py``
   of the sdist with pytest, once per mode, Redis flushed before each run:

   - ``plain``: Celery alone, the baseline;
   - ``while_executing``: both apps of the suite with
     ``task_cls="celery_dedup:DedupTask"``, every task opted in with
     ``dedup_lock="while_executing"`` (``task_annotations={"*": ...}``, the
     ``dedup_lock`` setting and a ``dedup_tasks`` entry per task), and
     ``celery_dedup.install(app)``, so that ``send_task`` by name and the
     suite's class-based tasks (base ``celery.Task``) are covered too;
   - ``until_executed``: the same with ``dedup_lock="until_executed"``.

   This is done by the pytest plugin ``scripts/celery_integration_plugin.py``
   (``-p celery_integration_plugin``), which extends the suite's
   ``celery_config`` and ``celery_parameters`` fixtures and checks, before
   the in-process worker starts, that every task (``add`` among them) is a
   DedupTask that opts in; the run stops at once if not. The suite runs with
   ``--import-mode=append``, so it tests the installed Celery, not the copy
   in the sdist, and with ``WORKER_LOGLEVEL=INFO`` (at the default,
   ``error``, the worker logs none of the INFO records that
   ``test_trace_log_arguments`` reads, and it fails in every mode).
4. After each run, prints the counts (passed, failed, error, skipped,
   xfailed, xpassed; reruns) and the celery-dedup keys left held in Redis
   (``dedup:*:claim`` and ``dedup:*:lease``, with their holders); at the end,
   a table of the runs and the "new failures": tests that fail in a
   celery-dedup run but pass in the plain one, each with a one-line reason.

Options:

--mode MODE       plain, while_executing, until_executed or all (default all)
-k EXPR           passed to pytest: run only the tests EXPR selects
--timeout S       per-test timeout in seconds (default 300, what the suite
                  gives its ``flaky`` tests: three chord tests take 60 to
                  150 s in a plain run); it also caps the suite's own
                  ``timeout`` marks, which would otherwise win
--max-reruns N    cap the reruns of the suite's ``flaky`` marks (default 1;
                  the suite asks for up to 5; 0: no reruns)
--keep            keep the sdist, unpacked, under
                  ``$XDG_CACHE_HOME/celery-dedup/celery-integration/`` and
                  reuse it next time (default: a temporary folder, removed)
--json            print one JSON object on stdout (the human output, pytest's
                  included, goes to stderr)
--install-deps    pip install the suite's missing test dependencies
                  (pytest-timeout, pytest-rerunfailures, pydantic), at the
                  versions the sdist's requirements name
--quiet           do not show pytest's own output (only the summaries)
--log-dir DIR     keep each run's pytest output and outcomes there (with
                  --keep, by default in the cache folder's ``logs/``)
--baseline FILE   a previous ``--json`` output whose plain run is the
                  baseline when this one runs no plain mode

Exit status: 0 when no celery-dedup run has new failures compared to the
plain one; 1 otherwise; 2 on a setup problem (no redis-server, a missing
dependency, the download failed, or the plugin found a task that does not
run as a DedupTask), with a one-line message; 130 on Ctrl-C.

Without a plain run (``--mode while_executing``) and without ``--baseline``,
every failing test counts as new.

Only the two suite files run: the other integration tests need services this
script does not start (RabbitMQ, the database, cache and other result
backends), or test Celery's own worker topology. Within the two files, the
tests that need RabbitMQ or a result backend other than Redis skip
themselves; the skipped tests are listed with their reasons.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

SCRIPTS = Path(__file__).resolve().parent
PLUGIN = "celery_integration_plugin"
MODES = ("plain", "while_executing", "until_executed")
DEDUP_MODES = MODES[1:]
SUITE_FILES = ("t/integration/test_tasks.py", "t/integration/test_canvas.py")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
FAILING = frozenset({"failed", "error"})
KEY_PREFIX = "dedup"
#: import name -> distribution name, of what the suite needs besides pytest
DEPENDENCIES = {
    "pytest_timeout": "pytest-timeout",
    "pytest_rerunfailures": "pytest-rerunfailures",
    "pydantic": "pydantic",
}


class SetupError(Exception):
    """A problem that keeps the check from running: exit status 2."""


# -- command line -----------------------------------------------------------------


def _epilog() -> str:
    """The module docstring without its usage line and option list."""
    text = __doc__ or ""
    body = text.split("What it does:", 1)[-1]
    steps, rest = body.split("Options:", 1)
    return "what it does:" + steps + "exit" + rest.split("Exit", 1)[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/celery-integration",
        description="Run Celery's own integration suite (the sdist of the "
        "installed release) as a drop-in check of celery-dedup.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--mode", choices=(*MODES, "all"), default="all", help="default: all")
    add("-k", dest="keyword", metavar="EXPR", help="passed to pytest")
    add(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="per-test timeout, also caps the suite's timeout marks (default 300)",
    )
    add(
        "--max-reruns",
        type=int,
        default=1,
        metavar="N",
        help="cap the reruns of the suite's flaky marks (default 1; 0: none)",
    )
    add(
        "--keep",
        action="store_true",
        help=f"keep the sdist (and logs) under {cache_root()} and reuse it",
    )
    add("--json", action="store_true", help="one JSON object on stdout")
    add(
        "--install-deps",
        action="store_true",
        help="pip install the suite's missing test dependencies",
    )
    add("--quiet", action="store_true", help="do not show pytest's own output")
    add("--log-dir", type=Path, metavar="DIR", help="keep each run's output there")
    add(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="a previous --json output: its plain run is the baseline",
    )
    return parser.parse_args(argv)


# -- the sdist ------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "celery-dedup" / "celery-integration"


def fetch_sdist(version: str, folder: Path, say: TextIO) -> Path:
    """Download and unpack celery==version into ``folder``; the source tree."""
    tree = folder / f"celery-{version}"
    if (tree / "t" / "integration" / "conftest.py").exists():
        print(f"using the sdist unpacked in {tree}", file=say)
        return tree
    download = folder / "download"
    download.mkdir(parents=True, exist_ok=True)
    archives = sorted(download.glob(f"celery-{version}.tar.gz"))
    if not archives:
        print(f"downloading the sdist of celery {version} ...", file=say, flush=True)
        command = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
            "--no-deps", "--disable-pip-version-check", "-q",
            f"celery=={version}", "-d", str(download),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = sorted(download.glob(f"celery-{version}.tar.gz"))
        if done.returncode != 0 or not archives:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln]
            why = lines[-1] if lines else f"pip exited with {done.returncode}"
            raise SetupError(f"pip download celery=={version} failed: {why}")
    with tarfile.open(archives[0]) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(folder, filter="data")
        else:  # pragma: no cover - Python without the extraction filters
            archive.extractall(folder)
    for name in (*SUITE_FILES, "t/integration/conftest.py", "pyproject.toml"):
        if not (tree / name).exists():
            raise SetupError(f"the celery {version} sdist has no {name}")
    return tree


def requirement_pins(tree: Path) -> dict[str, str]:
    """Distribution name -> requirement line, from the sdist's requirements."""
    pins = {}
    for path in sorted((tree / "requirements").rglob("*.txt")):
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*([<>=!~].*)?$", line)
            if match:
                pins.setdefault(match.group(1).lower(), line)
    return pins


def check_dependencies(tree: Path, install: bool, say: TextIO) -> list[str]:
    """The suite's test dependencies; install the missing ones if asked."""
    missing = [
        dist for mod, dist in DEPENDENCIES.items() if not importlib.util.find_spec(mod)
    ]
    if not missing:
        return []
    pins = requirement_pins(tree)
    wanted = [pins.get(dist, dist) for dist in missing]
    if not install:
        raise SetupError(
            f"missing test dependencies: {' '.join(wanted)} "
            "(pip install them, or run with --install-deps)"
        )
    print(f"installing {' '.join(wanted)} ...", file=say, flush=True)
    command = [
        sys.executable, "-m", "pip", "install", "-q",
        "--disable-pip-version-check", *wanted,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln]
        raise SetupError(
            f"pip install {' '.join(wanted)} failed: {lines[-1] if lines else ''}"
        )
    importlib.invalidate_caches()
    return wanted


# -- Redis ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def private_redis(folder: Path) -> Iterator[int]:
    """A redis-server on a free loopback port, without persistence; its port."""
    import redis  # noqa: PLC0415

    binary = shutil.which("redis-server")
    if binary is None:
        raise SetupError("redis-server is not on PATH (apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(folder),
        "--logfile", str(folder / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise SetupError(f"redis-server exited at start ({folder}/redis.log)")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SetupError(
                        f"redis-server did not answer on port {port}"
                    ) from None
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _task_of(member: str) -> str:
    """The task id of a lease member (``<len>:<id>|host|pid[|thread]``)."""
    match = re.match(r"^(\d+):", member)
    if match:
        start = match.end()
        return member[start : start + int(match.group(1))]
    return member.split("|", 1)[0]


def dedup_keys(port: int) -> dict[str, Any]:
    """What celery-dedup left in Redis: the held claims and leases (with their
    holders, the holder's task name and state from the result backend), and
    how many fencing counters and completion markers the run wrote."""
    import redis  # noqa: PLC0415

    client = redis.Redis(port=port, decode_responses=True)
    counts: Counter[str] = Counter()
    claims: list[dict[str, Any]] = []
    leases: list[dict[str, Any]] = []
    now_ms = int(client.time()[0]) * 1000
    try:
        for key in client.scan_iter(match=f"{KEY_PREFIX}:*", count=1000):
            kind = key.rsplit(":", 1)[-1]
            if ":done:" in key:
                kind = "done"
            counts[kind] += 1
            if kind == "claim":
                holder = client.get(key)
                claims.append(
                    {"key": key, "holder": holder, "ttl": client.pttl(key) / 1000}
                )
            elif kind == "lease":
                members = client.zrange(key, 0, -1, withscores=True)
                leases.append(
                    {
                        "key": key,
                        "ttl": client.pttl(key) / 1000,
                        "members": [
                            {
                                "holder": _task_of(m),
                                "member": m,
                                "expires_in": round((score - now_ms) / 1000, 1),
                            }
                            for m, score in members
                        ],
                    }
                )
        for entry in [*claims, *(m for lease in leases for m in lease["members"])]:
            meta = client.get(f"celery-task-meta-{entry['holder']}")
            if meta:
                with contextlib.suppress(ValueError, TypeError):
                    data = json.loads(meta)
                    entry["task"] = data.get("name")
                    entry["state"] = data.get("status")
            entry.setdefault("state", "PENDING (no result)")
    except redis.RedisError as exc:
        return {"error": repr(exc), "counts": dict(counts)}
    finally:
        client.close()
    return {"counts": dict(counts), "claims": claims, "leases": leases}


def flush(port: int) -> None:
    import redis  # noqa: PLC0415

    client = redis.Redis(port=port)
    client.flushall()
    client.close()


# -- one run --------------------------------------------------------------------------


def run_suite(
    mode: str,
    tree: Path,
    port: int,
    work: Path,
    args: argparse.Namespace,
    say: TextIO,
) -> dict[str, Any]:
    """Run the two suite files in ``mode``; the outcomes and the Redis keys."""
    flush(port)
    results = work / f"{mode}.json"
    log = work / f"{mode}.log"
    url = f"redis://127.0.0.1:{port}/0"
    tmp = work / f"tmp-{mode}"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        TEST_BROKER=url,
        TEST_BACKEND=url,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(port),
        WORKER_LOGLEVEL="INFO",
        PYTHONDONTWRITEBYTECODE="1",
        TMPDIR=str(tmp),
        PYTHONPATH=os.pathsep.join(
            [str(SCRIPTS), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    )
    env.pop("NO_WORKER", None)
    command = [
        sys.executable, "-m", "pytest",
        "-c", str(tree / "pyproject.toml"), "--rootdir", str(tree),
        "--import-mode=append", "-p", "celery.contrib.pytest", "-p", PLUGIN,
        "-p", "no:cacheprovider", "--color=no", "-q", "-rfE", "--durations=10",
        "--timeout", f"{args.timeout:g}",
        "--dedup-mode", mode, "--dedup-results", str(results),
        "--dedup-max-reruns", str(args.max_reruns),
    ]  # fmt: skip
    if args.keyword:
        command += ["-k", args.keyword]
    command += [str(tree / name) for name in SUITE_FILES]
    shown = shlex.join(command).replace(str(tree), "$SDIST")
    print(f"\n=== {mode}\n    SDIST={tree} {shown}", file=say, flush=True)
    started = time.monotonic()
    at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    status = _run_logged(command, env, work, log, None if args.quiet else say)
    duration = time.monotonic() - started
    if not results.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SetupError(
            f"{mode}: pytest exited with {status} and wrote no outcomes: "
            + " | ".join(tail)
        )
    data = json.loads(results.read_text())
    if status in (3, 4):
        message = _exit_message(log)
        raise SetupError(f"{mode}: the run stopped (pytest status {status}): {message}")
    data["exitstatus"] = status
    data["duration"] = round(duration, 1)
    data["started"] = at
    data["summary_line"] = _summary_line(log)
    data["counts"] = count(data["tests"])
    data["redis"] = dedup_keys(port)
    data["log"] = str(log)
    return data


def _run_logged(
    command: list[str], env: dict[str, str], cwd: Path, log: Path, echo: TextIO | None
) -> int:
    """Run ``command`` in its own process group, its output into ``log`` (and
    ``echo``); on Ctrl-C interrupt it, and kill what is left of its group."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pool children too, killed with it
        )
        assert process.stdout is not None
        try:
            while chunk := os.read(process.stdout.fileno(), 65536):
                out.write(chunk)
                if echo is not None:
                    echo.write(chunk.decode(errors="replace"))
                    echo.flush()
            return process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(20)
            raise
        finally:
            # The in-process worker's pool children, if pytest left any.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.stdout.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)


def _summary_line(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if re.search(
            r"\b(passed|failed|error|skipped|deselected)\b.* in [\d.]+s", line
        ):
            return line.strip("= ").strip()
    return ""


def _exit_message(log: Path) -> str:
    text = log.read_text(errors="replace")
    match = re.search(r"(?:Exit|UsageError|ERROR): (.*)", text)
    return match.group(1).strip() if match else text.strip().splitlines()[-1]


def count(tests: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts = Counter(entry["outcome"] for entry in tests.values())
    result = {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}
    result["reruns"] = sum(entry["reruns"] for entry in tests.values())
    result["subtests_failed"] = sum(e["subtests_failed"] for e in tests.values())
    return result


def new_failures(
    run: dict[str, Any], baseline: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Tests that fail (or error) in ``run`` but pass in ``baseline``."""
    found = []
    for test, entry in sorted(run["tests"].items()):
        if entry["outcome"] not in FAILING:
            continue
        before = (baseline or {}).get("tests", {}).get(test)
        if baseline is None or (before is not None and before["outcome"] == "passed"):
            found.append(
                {"test": test, "outcome": entry["outcome"], "reason": entry["reason"]}
            )
    return found


# -- reports --------------------------------------------------------------------------


def _short(test: str) -> str:
    return test.split("t/integration/", 1)[-1]


def print_run(run: dict[str, Any], say: TextIO) -> None:
    counts = run["counts"]
    line = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o])
    print(f"\n--- {run['mode']}: {line or 'no tests'}", file=say)
    print(
        f"    reruns {counts['reruns']}, subtests failed {counts['subtests_failed']}, "
        f"{run['duration']:.0f} s from {run['started']}; "
        f"pytest: {run['summary_line']}",
        file=say,
    )
    for check in run.get("checks", []):
        print(f"    check: {check}", file=say)
    keys = run["redis"]
    if "error" in keys:
        print(f"    Redis keys: could not scan ({keys['error']})", file=say)
        return
    tally = keys["counts"]
    print(
        f"    celery-dedup keys left: {tally.get('claim', 0)} claims, "
        f"{tally.get('lease', 0)} leases held; {tally.get('fence', 0)} fencing "
        f"counters, {tally.get('done', 0)} completion markers",
        file=say,
    )
    for claim in keys["claims"][:20]:
        print(
            f"      claim {claim['key']} held by {claim['holder']} "
            f"({claim.get('task')}, {claim['state']}), ttl {claim['ttl']:.0f} s",
            file=say,
        )
    for lease in keys["leases"][:20]:
        for member in lease["members"] or [{"holder": "(no member)"}]:
            print(
                f"      lease {lease['key']} held by {member['holder']} "
                f"({member.get('task')}, {member.get('state')}), "
                f"expires in {member.get('expires_in')} s",
                file=say,
            )
    more = max(0, len(keys["claims"]) - 20) + max(0, len(keys["leases"]) - 20)
    if more:
        print(f"      ... and {more} more", file=say)
    failing = [
        (t, e) for t, e in sorted(run["tests"].items()) if e["outcome"] in FAILING
    ]
    for test, entry in failing:
        print(f"    {entry['outcome']}: {_short(test)}: {entry['reason']}", file=say)


def print_skips(run: dict[str, Any], say: TextIO) -> None:
    reasons = Counter(
        (entry["reason"] or "").removeprefix("Skipped: ")
        for entry in run["tests"].values()
        if entry["outcome"] == "skipped"
    )
    if reasons:
        print(f"\nskipped in {run['mode']} (by the suite itself):", file=say)
        for reason, n in reasons.most_common():
            print(f"    {n} x {reason}", file=say)


def print_table(
    runs: dict[str, dict[str, Any]],
    news: dict[str, list[dict[str, Any]] | None],
    say: TextIO,
) -> None:
    header = f"{'run':<16}" + "".join(f"{o:>8}" for o in OUTCOMES)
    header += f"{'reruns':>8}{'claims':>8}{'leases':>8}{'new':>6}{'time':>8}"
    print("\n" + header, file=say)
    for mode, run in runs.items():
        counts = run["counts"]
        tally = run["redis"].get("counts", {})
        new = news.get(mode)
        row = f"{mode:<16}" + "".join(f"{counts[o]:>8}" for o in OUTCOMES)
        row += f"{counts['reruns']:>8}{tally.get('claim', 0):>8}"
        row += f"{tally.get('lease', 0):>8}{'-' if new is None else len(new):>6}"
        row += f"{run['duration'] / 60:>7.1f}m"
        print(row, file=say)
    for mode, new in news.items():
        if not new:
            continue
        print(f"\nnew failures in {mode} ({len(new)}):", file=say)
        for item in new:
            print(f"    {_short(item['test'])}: {item['reason']}", file=say)
    plain = runs.get("plain")
    for mode in DEDUP_MODES:
        run = runs.get(mode)
        if run is None or plain is None:
            continue
        fixed = [
            t
            for t, e in run["tests"].items()
            if e["outcome"] == "passed"
            and plain["tests"].get(t, {}).get("outcome") in FAILING
        ]
        if fixed:
            short = ", ".join(_short(t) for t in fixed)
            print(f"\npass in {mode}, fail in plain: {short}", file=say)
        rerun = [
            t
            for t, e in run["tests"].items()
            if e["outcome"] == "passed"
            and e["reruns"]
            and not plain["tests"].get(t, {}).get("reruns")
        ]
        if rerun:
            short = ", ".join(_short(t) for t in rerun)
            print(f"\npassed only on a rerun in {mode}: {short}", file=say)


def source_state(package_init: Path) -> str:
    """Where celery-dedup is imported from, and its git commit (read only):
    the core may change between two runs."""
    package = package_init.resolve().parent
    where = f"from {package}"
    git = shutil.which("git")
    if git is None:
        return where
    head = subprocess.run(
        [git, "-C", str(package), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if head.returncode != 0:
        return where
    changed = subprocess.run(
        [git, "-C", str(package), "status", "--porcelain", "--", "."],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    files = len(changed.stdout.splitlines())
    return f"{where}, commit {head.stdout.strip()}" + (
        f" + {files} uncommitted file(s)" if files else ""
    )


# -- main -----------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = sys.stderr if args.json else sys.stdout
    # Also when started with SIGINT ignored (a background job of a script);
    # pytest, exec'd, then gets the default disposition and our SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    modes = MODES if args.mode == "all" else (args.mode,)
    report: dict[str, Any] = {"modes": list(modes), "runs": {}, "new_failures": {}}
    try:
        return _main(args, modes, report, say)
    except SetupError as exc:
        print(f"celery-integration: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        if args.json:
            print(json.dumps(report, indent=1, default=str))
        return 2
    except KeyboardInterrupt:
        print("\ncelery-integration: interrupted", file=sys.stderr)
        return 130


def _main(
    args: argparse.Namespace,
    modes: tuple[str, ...],
    report: dict[str, Any],
    say: TextIO,
) -> int:
    if shutil.which("redis-server") is None:
        raise SetupError("redis-server is not on PATH (apt-get install redis-server)")
    try:
        import celery  # noqa: PLC0415

        if set(modes) & set(DEDUP_MODES):
            import celery_dedup  # noqa: PLC0415
    except ImportError as exc:
        raise SetupError(f"cannot import {exc.name}") from exc
    version = celery.__version__
    report["celery"] = version
    if set(modes) & set(DEDUP_MODES):
        report["celery_dedup"] = celery_dedup.__version__
        report["celery_dedup_source"] = source_state(Path(celery_dedup.__file__))
        print(f"celery-dedup {report['celery_dedup_source']}", file=say)
    baseline = None
    if args.baseline is not None and "plain" not in modes:
        try:
            baseline = json.loads(args.baseline.read_text())["runs"]["plain"]
        except (OSError, ValueError, KeyError) as exc:
            raise SetupError(
                f"--baseline {args.baseline}: no plain run ({exc})"
            ) from exc

    with contextlib.ExitStack() as stack:
        if args.keep:
            folder = cache_root() / f"celery-{version}"
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="celery-integration-")))  # fmt: skip
        log_dir = args.log_dir or (folder / "logs" if args.keep else None)
        tree = fetch_sdist(version, folder, say)
        report["sdist"] = str(tree)
        report["installed"] = check_dependencies(tree, args.install_deps, say)
        work = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="celery-int-run-"))
        )
        port = stack.enter_context(private_redis(work / "redis"))
        print(
            f"celery {version} suite from {tree}; private redis-server on port {port}",
            file=say,
        )
        for mode in modes:
            run = run_suite(mode, tree, port, work, args, say)
            report["runs"][mode] = run
            print_run(run, say)
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(run["log"], log_dir / f"{mode}.log")
                run["log"] = str(log_dir / f"{mode}.log")
                (log_dir / f"{mode}.json").write_text(json.dumps(run, indent=1))
            else:
                run["log"] = None  # removed with the temporary folder
    return finish(args, modes, report, baseline, say)


def finish(
    args: argparse.Namespace,
    modes: tuple[str, ...],
    report: dict[str, Any],
    baseline: dict[str, Any] | None,
    say: TextIO,
) -> int:
    """Compare the runs with the baseline, print the table; the exit status."""
    runs = report["runs"]
    baseline = runs.get("plain", baseline)
    news: dict[str, list[dict[str, Any]] | None] = {"plain": None}
    for mode in modes:
        if mode != "plain":
            news[mode] = new_failures(runs[mode], baseline)
    report["new_failures"] = {m: v for m, v in news.items() if v is not None}
    report["baseline"] = (
        "plain run" if "plain" in runs else str(args.baseline) if baseline else None
    )
    if "plain" in runs:
        print_skips(runs["plain"], say)
    print_table({m: runs[m] for m in modes}, news, say)
    failed = any(news[m] for m in modes if m != "plain")
    report["exit"] = 1 if failed else 0
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return int(report["exit"])


if __name__ == "__main__":
    sys.exit(main())
