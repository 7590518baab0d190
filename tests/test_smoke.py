from pathlib import Path

from conftest import Mount


def test_mount_over_source_shows_existing_files(store: Path, mount_factory) -> None:
    (store / "old.txt").write_text("before\n")
    m: Mount = mount_factory(store)
    assert (store / "old.txt").read_text() == "before\n"
    (store / "new.txt").write_text("after\n")
    m.stop()
    assert (store / "new.txt").read_text() == "after\n"
