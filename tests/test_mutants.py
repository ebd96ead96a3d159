"""The mutation list (tools/mutations.toml) still applies to the code, and names tests that exist.

The mutation run itself is too slow for CI (``make mutants``); this keeps it from going stale
unnoticed: a refactor that moves a mutated line must update the mutation in the same change.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from mutants import load_mutations, stale_reason  # noqa: E402


def test_every_mutation_applies_to_the_code_as_it_is():
    mutations = load_mutations()
    assert len(mutations) >= 25
    stale = {m.name: stale_reason(m) for m in mutations if stale_reason(m)}
    assert not stale, f"update these mutations in tools/mutations.toml to the current code: {stale}"


def test_every_named_test_exists():
    missing = []
    for m in load_mutations():
        for node in m.tests:
            path, _, name = node.partition("::")
            source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
            if not name or not re.search(rf"^def {re.escape(name)}\(", source, re.MULTILINE):
                missing.append(f"{m.name}: {node}")
    assert not missing, missing
