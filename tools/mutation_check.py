"""Plant known async-scheduling bugs one at a time and check the tests catch each (issues 12, 16).

Runs in a throwaway git worktree of HEAD, so the checkout is never touched:
    .venv/bin/python tools/mutation_check.py            (MUTANTS=M1,M9 for a subset)
Each line: the planted bug, the test target, CAUGHT or missed, seconds.
The state machine is expected to miss M6 (queue order changes fairness, not tokens);
the deterministic regression tests pin it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

# (name, file, original text, planted text): each a classic one-step-ahead scheduler bug.
MUTANTS = [
    ("M1 resume a preempted request before its in-flight token arrives", "aiosched/async_scheduler.py", "return req.num_output_placeholders == 0", "return True"),
    ("M2 off-by-one: schedule past the stop length in async mode", "aiosched/async_scheduler.py", "if total >= req.stop_length:", "if total > req.stop_length:"),
    ("M3 prefix hits in the free list not counted against free blocks", "aiosched/kv_cache.py", "revived = sum(1 for b in cached if self.pool.ref_cnt[b] == 0)", "revived = 0"),
    ("M4 rejected draft slots kept as computed", "aiosched/scheduler.py", "req.num_computed_tokens -= 1 + d - len(tokens)", "pass"),
    ("M5 register hashes of blocks holding placeholders", "aiosched/kv_cache.py", "num_full = (n_tokens if n_tokens < known else known) // self.block_size", "num_full = n_tokens // self.block_size"),
    ("M6 preempted request goes to the back of the queue", "aiosched/scheduler.py", "self.waiting.appendleft(req)\n        self._freed_for_worker", "self.waiting.append(req)\n        self._freed_for_worker"),
    ("M7 in-flight token of an aborted request not discarded", "aiosched/scheduler.py", "            if req is None:  # finished or aborted while this step was in flight\n                stats.discarded_tokens += len(tokens)\n                continue", "            if req is None:  # finished or aborted while this step was in flight\n                continue"),
    ("M8 placeholder not consumed when the token arrives", "aiosched/scheduler.py", "            req.num_output_placeholders -= 1\n", "            req.num_output_placeholders -= 0 if req.num_preemptions else 1\n"),
    # Issue 16.1: a grammar sample in flight survives its request's free and is consumed
    # again by the resumed request (same id): the matcher runs one token behind.
    ("M9 grammar sample in flight outlives the request's free", "executors/structured_output.py",
     [("        if rg is None or not self._pending:\n            return", "        if True:\n            return"),
      ("                rg.outputs.append(int(vals[i]))", "                self.grammars.get(rg.req_id, rg).outputs.append(int(vals[i]))")],
     None, ["tests/test_stateful_scheduler.py::test_engine_state_machine_structured"]),
]


def main() -> int:
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    tree = tempfile.mkdtemp(prefix="aiosched-mutants-")
    subprocess.run(["git", "-C", repo, "worktree", "add", "-q", "--detach", tree, "HEAD"], check=True)
    try:
        os.chdir(tree)
        # The editable install maps `aiosched.executors` to the checkout's executors/; a link
        # inside this tree's package makes the tree's own (mutated) copy the one imported.
        os.symlink(os.path.join("..", "executors"), os.path.join("aiosched", "executors"))
        run_mutants()
    finally:
        subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree], check=False)
    return 0


TARGETS = ["tests/test_stateful_scheduler.py::test_async_scheduler_state_machine", "tests/test_scheduler_regressions.py"]


def run_mutants() -> None:
    only = os.environ.get("MUTANTS")  # e.g. MUTANTS=M1,M9: a subset
    for name, path, old, new, *targets in MUTANTS:
        if only and name.split()[0] not in only.split(","):
            continue
        with open(path) as f:
            src = f.read()
        edits = old if isinstance(old, list) else [(old, new)]  # one replacement, or several (old, new) pairs
        planted = src
        for a, b in edits:
            assert planted.count(a) == 1, f"{name}: the original text is no longer in {path}; update the mutant"
            planted = planted.replace(a, b)
        with open(path, "w") as f:
            f.write(planted)
        try:
            for target in (targets[0] if targets else TARGETS):
                t0 = time.time()
                r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", target],
                                   capture_output=True, text=True, timeout=300)
                verdict = "CAUGHT" if r.returncode else "missed"
                print(f"{name} | {target.split('/')[-1]} | {verdict} | {time.time() - t0:.0f}s", flush=True)
        finally:
            with open(path, "w") as f:
                f.write(src)

if __name__ == "__main__":
    sys.exit(main())
