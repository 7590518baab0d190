"""Which extended attribute names the mount does not support, by what the machine runs."""

from __future__ import annotations

from pathlib import Path

from zstfs.xattrs import ACL_XATTRS, SELINUX_XATTR, unsupported_xattrs


def test_labels_pass_through_only_where_selinux_runs(tmp_path: Path) -> None:
    assert unsupported_xattrs(str(tmp_path / "absent")) == ACL_XATTRS | {SELINUX_XATTR}
    assert unsupported_xattrs(str(tmp_path)) == ACL_XATTRS  # selinuxfs is mounted there
