"""What the tests share: mounts and the zstfs command (`mount`), zstfs in one process without a
mount (`inprocess`), the real Codex CLI against a mock model (`codex`), the check that fails a
test on an unexpected error in zstfs's logs (`logcheck`), and stores built for tests (`stores`)."""
