"""`make compat`: run the backend test suites against the oldest and the newest version of
each framework, each set in its own virtual environment, and write docs/compat.md.

    python3 compat/run.py                    # every environment in compat/matrix.toml
    python3 compat/run.py --only jax-oldest  # some of them; the others keep their last results
    python3 compat/run.py --render           # only rewrite docs/compat.md from stored results

Environments live in .compat/<name>/ and are reused while their pins do not change. The code
under test is a snapshot of the last commit (.compat/src, from `git archive HEAD`), so that
edits made in the work tree during a long run do not leak into it; `--worktree` tests the
work tree as it is instead. Results are kept in .compat/results/<name>.json; the table is
rendered from them, for the environments in the matrix, in matrix order.

Standard library only: it runs on the machine's python3, outside any of the environments.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "compat" / "matrix.toml"
WORK = ROOT / ".compat"
RESULTS = WORK / "results"
DOC = ROOT / "docs" / "compat.md"

# What the table reports for each environment, as installed (distribution names).
VERSIONS = {
    "python": None,
    "torch": ["torch"],
    "keras": ["keras"],
    "tensorflow": ["tensorflow-cpu", "tensorflow"],
    "tf_keras": ["tf_keras", "tf-keras"],
    "jax": ["jax"],
    "jaxlib": ["jaxlib"],
    "flax": ["flax"],
    "optax": ["optax"],
    "equinox": ["equinox"],
    "transformers": ["transformers"],
    "peft": ["peft"],
    "accelerate": ["accelerate"],
    "lightning": ["lightning"],
    "numpy": ["numpy"],
}

_print_lock = threading.Lock()
_started = time.monotonic()


def say(message: str) -> None:
    elapsed = int(time.monotonic() - _started)
    with _print_lock:
        print(f"[compat {elapsed // 60:3d}:{elapsed % 60:02d}] {message}", flush=True)


def load_matrix() -> tuple[dict, list[dict]]:
    data = tomllib.loads(MATRIX.read_text())
    defaults = data.get("defaults", {})
    envs = data["env"]
    names = [e["name"] for e in envs]
    if len(set(names)) != len(names):
        raise SystemExit(f"compat/matrix.toml: duplicate environment names in {names}")
    return defaults, envs


def install_spec(env: dict, defaults: dict) -> dict:
    """Everything that decides what an environment contains: its hash names the build."""
    return {
        "python": sys.version.split()[0],
        "packages": env["packages"] + defaults.get("test_packages", []),
        "no_deps": env.get("no_deps", []),
    }


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# -- the code under test ---------------------------------------------------------------------------------
def snapshot(worktree: bool) -> tuple[Path, str]:
    """The source tree the environments install (editable) and the tests run from."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    if worktree:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return ROOT, commit + (" + uncommitted changes" if dirty else "")
    src = WORK / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src, commit


# -- environments ----------------------------------------------------------------------------------------
def pip(venv: Path, *args: str, log: Path) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
           *args]
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        # No pip cache: the CUDA builds of torch are several GB, downloads are fast here.
        environ = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=environ)
    if result.returncode != 0:
        tail = [line for line in log.read_text().splitlines() if not line.startswith("WARNING: Location")][-8:]
        raise RuntimeError("pip install failed:\n" + "\n".join(tail))


def build(env: dict, defaults: dict, src: Path, rebuild: bool) -> dict:
    """Create (or reuse) the environment; return its installed versions."""
    venv = WORK / env["name"]
    spec = install_spec(env, defaults)
    stamp = venv / ".compat-stamp.json"
    log = WORK / "logs" / f"{env['name']}.install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    fresh = rebuild or not stamp.exists() or json.loads(stamp.read_text()).get("hash") != spec_hash(spec)
    env["_built"] = fresh
    if fresh:
        say(f"{env['name']}: installing {' '.join(env['packages'] + env.get('no_deps', []))}")
        t0 = time.monotonic()
        if venv.exists():
            shutil.rmtree(venv)
        log.write_text("")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(venv, "-q", *spec["packages"], log=log)
        if spec["no_deps"]:
            pip(venv, "-q", "--no-deps", *spec["no_deps"], log=log)
        stamp.write_text(json.dumps({"hash": spec_hash(spec), "spec": spec}, indent=1))
        say(f"{env['name']}: installed in {time.monotonic() - t0:.0f} s")
    else:
        say(f"{env['name']}: reusing .compat/{env['name']} (pins unchanged)")
    # layerlock itself, editable, without its extras (the pins above are the frameworks);
    # done on every run since the snapshot or work tree may have moved.
    pip(venv, "-q", "--no-deps", "-e", str(src), log=log)
    return installed_versions(venv)


def installed_versions(venv: Path) -> dict:
    code = (
        "import json, platform, importlib.metadata as m\n"
        f"wanted = json.loads({json.dumps(VERSIONS)!r})\n"
        "out = {}\n"
        "for key, names in wanted.items():\n"
        "    if names is None:\n"
        "        out[key] = platform.python_version(); continue\n"
        "    for n in names:\n"
        "        try: out[key] = m.version(n); break\n"
        "        except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


# -- test runs -------------------------------------------------------------------------------------------
def run_tests(env: dict, run: dict, defaults: dict, src: Path) -> dict:
    venv = WORK / env["name"]
    slug = f"{env['name']}--{run['label']}".replace("=", "-").replace(" ", "_")
    junit = WORK / "logs" / f"{slug}.xml"
    log = WORK / "logs" / f"{slug}.log"
    files = [f for f in run["files"] if (src / f).exists()]
    missing = [f for f in run["files"] if f not in files]
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           "--continue-on-collection-errors",
           f"--junitxml={junit}", *files]
    keyword = []
    if run.get("select"):
        keyword.append(f"({run['select']})")
    if run.get("deselect"):
        keyword.append(f"not ({run['deselect']})")
    if keyword:
        cmd += ["-k", " and ".join(keyword)]
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
               **run.get("environ", {})}
    environ.pop("VIRTUAL_ENV", None)
    environ.pop("PYTHONPATH", None)
    if junit.exists():
        junit.unlink()
    say(f"{env['name']} [{run['label']}]: pytest {len(files)} files")
    t0 = time.monotonic()
    timeout = run.get("timeout_s", defaults.get("timeout_s", 1800))
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        try:
            code = subprocess.run(cmd, cwd=src, stdout=out, stderr=subprocess.STDOUT, env=environ,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.monotonic() - t0
    result = {"label": run["label"], "files": files, "missing_files": missing,
              "select": " and ".join(keyword), "environ": run.get("environ", {}),
              "date": dt.date.today().isoformat(), "seconds": round(seconds), "exit": code,
              **parse_junit(junit)}
    if code == "timeout":
        result["failures"].insert(0, {"test": "(whole run)", "error": f"timed out after {timeout} s"})
    elif not junit.exists() or (code not in (0, 1) and not result["failures"]):
        # pytest crashed or refused to start: its own last lines say why
        tail = [line for line in log.read_text().splitlines() if line.strip()][-3:]
        result["failures"].insert(0, {"test": "(pytest exit %s)" % code, "error": " | ".join(tail)[:300]})
    say(f"{env['name']} [{run['label']}]: {result['passed']} passed, {result['failed']} failed, "
        f"{result['skipped']} skipped in {seconds:.0f} s (log: {log.relative_to(ROOT)})")
    return result


def parse_junit(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                counts["failures"].append({"test": test_id(case), "error": first_error_line(child)})
                break
            if child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return counts


def test_id(case: ET.Element) -> str:
    """pytest's node id from junit's dotted classname (tests.test_x.TestClass -> tests/test_x.py::TestClass)."""
    parts = case.get("classname", "").split(".")
    for i in range(len(parts), 0, -1):
        module = "/".join(parts[:i]) + ".py"
        if (ROOT / module).exists():
            return "::".join([module, *parts[i:], case.get("name", "")])
    return "::".join([*parts, case.get("name", "")])


def first_error_line(element: ET.Element) -> str:
    """What went wrong, in one line: the first `E ...` line pytest marks, else junit's message."""
    text = element.text or ""
    for line in text.splitlines():
        if line.startswith("E ") and line[1:].strip():
            return line[1:].strip()[:300]
    message = (element.get("message") or "").strip() or text.strip()
    return message.splitlines()[0][:300] if message else ""


# -- the page --------------------------------------------------------------------------------------------
def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace(">>>", "> > >").replace("\n", " ")


def render(envs: list[dict], commit: str | None) -> str:
    stored = {e["name"]: load_result(e["name"]) for e in envs}
    shown = [k for k in VERSIONS if any(k in (r or {}).get("versions", {}) for r in stored.values())]
    lines = [
        "# Compatibility matrix",
        "",
        "Which framework versions layerlock is tested against. `make compat` builds one virtual",
        "environment per row of `compat/matrix.toml` (the oldest and the newest version of each",
        "framework that installs on the test machine, Python " + sys.version.split()[0] + ", CPU), runs the",
        "backend test suites in it and writes this page. The lower bounds in `pyproject.toml`",
        "(`pip install layerlock[torch]`, `[keras]`, `[tensorflow]`, `[jax]`) are the oldest versions",
        "below that pass. `make test` runs one environment (the pins of `constraints.txt`);",
        "`make compat` is not part of CI.",
        "",
    ]
    if commit:
        lines += [f"Last run: {dt.date.today().isoformat()}, layerlock at commit `{commit}`.", ""]
    full = WORK / "full-run.json"
    if full.exists():
        last = json.loads(full.read_text())
        lines += [f"The last full run (`make compat`, {last['date']}) took {last['minutes']:.0f} minutes: "
                  f"{last['built']} environments built, {last['reused']} reused, {last['runs']} test runs.", ""]
    lines += ["## Versions", "", "| environment | " + " | ".join(shown) + " |",
              "|---|" + "---|" * len(shown)]
    for env in envs:
        r = stored[env["name"]]
        versions = (r or {}).get("versions", {})
        lines.append(f"| {env['name']} | " + " | ".join(cell(versions.get(k, "")) or "" for k in shown) + " |")
    lines += ["", "## Results", "",
              "| environment | run | passed | failed | skipped | time | date | test files |",
              "|---|---|---|---|---|---|---|---|"]
    for env in envs:
        r = stored[env["name"]]
        if not r:
            lines.append(f"| {env['name']} | not run yet | | | | | | |")
            continue
        if r.get("install_error"):
            lines.append(f"| {env['name']} | install failed | | | | | {r['date']} | {cell(r['install_error'][:200])} |")
            continue
        for run in r["runs"]:
            files = ", ".join(f.removeprefix("tests/") for f in run["files"])
            if run.get("select"):
                files += f" (`-k {cell(run['select'])}`)"
            failed = run["failed"] if run["exit"] in (0, 1) else f"{run['failed']} + crash"
            lines.append(f"| {env['name']} | {cell(run['label'])} | {run['passed']} | {failed} | "
                         f"{run['skipped']} | {run['seconds']} s | {run['date']} | {files} |")
    failing = [(e["name"], run) for e in envs for run in (stored[e["name"]] or {}).get("runs", []) if run["failures"]]
    lines += ["", "## Failures", ""]
    if not failing:
        lines += ["None: every run above passed.", ""]
    for name, run in failing:
        lines += [f"**{name} [{cell(run['label'])}]**: {run['failed']} failed. First failing: "
                  + ", ".join(f"`{f['test']}`" for f in run["failures"][:3]) + ". Errors:", ""]
        errors: dict[str, list[str]] = {}
        for f in run["failures"]:
            errors.setdefault(f["error"], []).append(f["test"])
        for error, tests in list(errors.items())[:6]:
            lines.append(f"- {len(tests)} × `{cell(error)}` (first: `{tests[0]}`)")
        if len(errors) > 6:
            lines.append(f"- and {len(errors) - 6} other errors: see `.compat/logs/`")
        lines.append("")
    lines += ["## Why these versions", ""]
    for env in envs:
        lines.append(f"- **{env['name']}** ({env.get('role', '')}): {' '.join(env.get('why', '').split())}")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lines += ["", "## The bounds in pyproject.toml", "", "| extra | requires |", "|---|---|"]
    for extra in ("torch", "keras", "tensorflow", "jax"):
        lines.append(f"| `{extra}` | " + ", ".join(f"`{r}`" for r in extras.get(extra, [])) + " |")
    lines += ["", "## Running it", "",
              "```sh",
              "make compat                                         # every environment",
              "python3 compat/run.py --only jax-oldest,jax-newest  # some; the others keep their results",
              "```", "",
              "Environments are kept in `.compat/<name>/` and reused while their pins are unchanged;",
              "the torch environments take about 5 GB each (the registry's torch builds bring CUDA).",
              "Logs are in `.compat/logs/`.", ""]
    return "\n".join(lines)


def load_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# -- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated environment names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="environments installed at once (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the environments even if unchanged")
    parser.add_argument("--worktree", action="store_true", help="test the work tree instead of the last commit")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/compat.md from stored results")
    parser.add_argument("--list", action="store_true", help="list the environments and exit")
    args = parser.parse_args(argv)

    defaults, envs = load_matrix()
    if args.list:
        for env in envs:
            print(f"{env['name']:18} {' '.join(env['packages'] + env.get('no_deps', []))}")
        return 0
    selected = envs
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {e["name"] for e in envs}
        if unknown:
            raise SystemExit(f"unknown environment(s) {sorted(unknown)}; known: {[e['name'] for e in envs]}")
        selected = [e for e in envs if e["name"] in names]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (WORK / ".gitignore").write_text("*\n")
    commit_file = WORK / "commit"
    if args.render:
        DOC.write_text(render(envs, commit_file.read_text().strip() if commit_file.exists() else None))
        say(f"wrote {DOC.relative_to(ROOT)}")
        return 0

    src, commit = snapshot(args.worktree)
    commit_file.write_text(commit + "\n")
    say(f"testing layerlock at {commit} from {src.relative_to(ROOT) if src != ROOT else 'the work tree'}; "
        f"{len(selected)} environments, {args.jobs} installs at a time")
    t0 = time.monotonic()
    bad = 0
    counts = {"built": 0, "reused": 0, "runs": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        builds = {pool.submit(build, env, defaults, src, args.rebuild): env for env in selected}
        # Tests run one environment at a time, while the next environments install.
        for future in concurrent.futures.as_completed(builds):
            env = builds[future]
            record = {"name": env["name"], "date": dt.date.today().isoformat(), "commit": commit,
                      "packages": env["packages"] + env.get("no_deps", []), "runs": []}
            try:
                record["versions"] = future.result()
            except Exception as error:  # noqa: BLE001 - reported in the table, the others go on
                say(f"{env['name']}: install FAILED: {error}")
                lines = str(error).splitlines() or [""]
                record["install_error"] = next((x for x in lines if x.startswith("ERROR:")), lines[-1])
                bad += 1
            else:
                counts["built" if env.get("_built") else "reused"] += 1
                for run in env["run"]:
                    counts["runs"] += 1
                    result = run_tests(env, run, defaults, src)
                    bad += bool(result["failures"])
                    record["runs"].append(result)
            (RESULTS / f"{env['name']}.json").write_text(json.dumps(record, indent=1))
    minutes = (time.monotonic() - t0) / 60
    if selected is envs:
        (WORK / "full-run.json").write_text(json.dumps({"date": dt.date.today().isoformat(), "minutes": minutes,
                                                         **counts}))
    DOC.write_text(render(envs, commit))
    say(f"done in {minutes:.1f} min; wrote {DOC.relative_to(ROOT)}; "
        f"{'all runs passed' if not bad else f'{bad} environment runs with failures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
