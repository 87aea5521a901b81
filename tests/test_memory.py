"""The memory a build may use: the machine's, or a cgroup's limit where a container sets one."""

from trtglm.core.memory import _cgroup_headroom


def _files(tmp_path, cgroup_line: str, files: dict[str, str]) -> tuple[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cgroup").write_text(cgroup_line + "\n")
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


def test_cgroup_v2_limit(tmp_path):
    root, cgroups = _files(tmp_path, "0::/ci/job", {"ci/job/memory.max": "17179869184\n",
                                                   "ci/job/memory.current": "1073741824\n"})
    assert _cgroup_headroom(root, cgroups) == 15 << 30


def test_cgroup_v2_inside_a_container_reads_the_mount_root(tmp_path):
    root, cgroups = _files(tmp_path, "0::/", {"memory.max": "max\n", "memory.current": "5\n"})
    assert _cgroup_headroom(root, cgroups) is None
    root, cgroups = _files(tmp_path, "0::/elsewhere", {"memory.max": "1000\n", "memory.current": "400\n"})
    assert _cgroup_headroom(root, cgroups) == 600


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    root, cgroups = _files(tmp_path, "4:memory:/job", {"memory/job/memory.limit_in_bytes": "2000\n",
                                                      "memory/job/memory.usage_in_bytes": "500\n"})
    assert _cgroup_headroom(root, cgroups) == 1500
    root, cgroups = _files(tmp_path / "b", "4:memory:/", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                                         "memory/memory.usage_in_bytes": "500\n"})
    assert _cgroup_headroom(root, cgroups) is None


def test_no_cgroup_files(tmp_path):
    assert _cgroup_headroom(str(tmp_path), str(tmp_path / "missing")) is None
