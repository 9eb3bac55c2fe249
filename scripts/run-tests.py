#!/usr/bin/env python3
"""Runs the workspace's test binaries (built by `cargo test --no-run`): unit tests first,
then the timing-sensitive ones alone (they compare rates with a control run in the same
test), then every other test binary, LANES at a time. Each binary's tests still run on
parallel threads, as `cargo test` runs them; every test makes its own uniquely named
namespaces, links, cgroups and pins, so binaries do not meet. Output is kept per binary and
printed when it ends; the summary closes the output. Exits non-zero if any binary failed.

Usage: run-tests.py [--lanes N] [--only NAME,...] [-- ARGS for every test binary]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

# Test binaries that measure rates against a control in the same run: nothing beside them.
ALONE = {"lifecycle"}
# The longest first, so the lanes end together.
LONGEST_FIRST = ["bench_smoke", "packets", "service", "local", "ops", "fragments", "e2e", "peer", "deploy", "icmp_errors"]


def build():
    """Builds every test binary and, in the same cargo run (one feature resolution, so the
    kernel object is built once), the `forwarder` binary the end-to-end tests run: cargo
    builds a package's binaries for its integration tests. Returns (unit, e2e) binaries
    and sets FORWARDER_BIN to the binary built."""
    out = subprocess.run(
        ["cargo", "test", "--workspace", "--exclude", "forwarder-ebpf", "--no-run", "--message-format=json-render-diagnostics"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    units, e2e = [], []
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        target = msg["target"]
        if target["kind"] == ["bin"] and target["name"] == "forwarder" and not msg.get("profile", {}).get("test"):
            os.environ.setdefault("FORWARDER_BIN", msg["executable"])
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        name = target["name"]
        entry = (name, msg["executable"], msg["manifest_path"])
        (e2e if target["kind"] == ["test"] else units).append(entry)
    if "FORWARDER_BIN" not in os.environ:
        sys.exit("run-tests: cargo built no `forwarder` binary (forwarder-user needs an integration test for that)")
    return units, e2e


def run(entry, args):
    name, exe, manifest = entry
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as log:
        # As cargo runs them: from the package's directory.
        rc = subprocess.run([exe] + args, cwd=os.path.dirname(manifest), stdout=log, stderr=subprocess.STDOUT).returncode
        log.seek(0)
        text = log.read()
    took = time.monotonic() - start
    print(f"\n===== {name} ({os.path.basename(exe)}): {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {took:.0f} s", flush=True)
    print(text, end="", flush=True)
    return name, rc, took


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--only", default="")
    p.add_argument("args", nargs="*")
    o = p.parse_args()
    only = set(filter(None, o.only.split(",")))
    units, e2e = build()
    pick = lambda xs: [x for x in xs if not only or x[0] in only]
    units, e2e = pick(units), pick(e2e)
    results = [run(u, o.args) for u in units]
    alone = [e for e in e2e if e[0] in ALONE]
    rank = lambda e: (LONGEST_FIRST.index(e[0]) if e[0] in LONGEST_FIRST else len(LONGEST_FIRST), e[0])
    rest = sorted((e for e in e2e if e[0] not in ALONE), key=rank)
    results += [run(e, o.args) for e in alone]
    with ThreadPoolExecutor(max_workers=max(1, o.lanes)) as pool:
        results += list(pool.map(lambda e: run(e, o.args), rest))
    print("\n===== summary")
    for name, rc, took in results:
        print(f"  {'ok    ' if rc == 0 else 'FAILED'} {name} ({took:.0f} s)")
    failed = [n for n, rc, _ in results if rc != 0]
    print(f"{len(results) - len(failed)} of {len(results)} test binaries passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
