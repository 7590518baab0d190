"""What the tests share: mounts and the `zstfs` command (`mount`, also the fixtures), zstfs in one
process without a mount (`inprocess`), the real Codex CLI against a mock model (`codex`), the
store seen from below while mounted (`backing`), zstd files as other writers make them
(`zstfiles`), and the check that fails a test on an error in zstfs's logs it did not declare
(`logcheck`)."""
