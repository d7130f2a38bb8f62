"""The mutation score per module from mutmut's results in `mutants/` (`make mutation` prints it).

Killed counts timeouts too (a mutant that hangs a test is caught). A module's survivors are listed by name so each
can be read with `mutmut show NAME`; those that no test can kill are named in docs/mutation.md.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          -11: "killed", -9: "killed"}
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests", None: "not checked"}


def scores(mutants: Path) -> dict[str, tuple[Counter, list[str]]]:
    """Per mutated file: how many mutants ended which way, and the names of those that were not killed."""
    results = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not any(code is not None for code in exit_codes.values()):
            continue  # a module not run (yet)
        counts = Counter("killed" if code in KILLED else SURVIVED.get(code, f"exit {code}")
                         for code in exit_codes.values())
        alive = sorted(name for name, code in exit_codes.items() if code not in KILLED and code is not None)
        results[str(meta.relative_to(mutants)).removesuffix(".meta")] = (counts, alive)
    return results


def main(mutants: Path = Path("mutants"), goal: float = 90.0) -> int:
    results = scores(mutants)
    print(f"{'module':40} {'mutants':>8} {'killed':>7} {'score':>7}  not killed")
    below = []
    for module, (counts, _) in results.items():
        total = sum(counts.values())
        score = 100 * counts["killed"] / total
        others = ", ".join(f"{n} {what}" for what, n in counts.items() if what != "killed")
        print(f"{module:40} {total:8} {counts['killed']:7} {score:6.1f}%  {others}")
        below += [module] if score < goal else []
    for _, alive in results.values():
        for name in alive:
            print(f"  {name}")
    if below:
        print(f"below {goal:g}%: {', '.join(below)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*(Path(a) for a in sys.argv[1:2])))
