"""The tests' shared harness is the package tests/harness; this loads its fixtures.

Layers: tests/unit (codec, store, the rollout generator), tests/inprocess (the store, file table,
operations and compactor in the test process, no mount), tests/mount (real mounts and the real
commands), tests/codex (the real Codex CLI through a mount).
"""

import pytest

pytest.register_assert_rewrite("harness")

pytest_plugins = ["harness.logcheck", "harness.mount"]
