"""The GPU kit's packing: the chunks one device command carries each, joined and checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.gpu_kit import REPO, device_calls, join_chunks, sha256, split_file


def test_chunks_join_to_the_file_and_a_missing_or_changed_chunk_is_named(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "kit.tar"
    path.write_bytes(data)
    digest = sha256(path)
    chunks = split_file(path, 3_000)
    assert [c.name for c in chunks] == ["kit.tar.000", "kit.tar.001", "kit.tar.002", "kit.tar.003"]
    assert [c.stat().st_size for c in chunks] == [3_000, 3_000, 3_000, 1_000]
    out = tmp_path / "joined.tar"
    join_chunks(tmp_path, "kit.tar", out, digest, len(chunks))
    assert out.read_bytes() == data
    chunks[2].unlink()
    with pytest.raises(SystemExit, match=r"3 of 4 chunks of kit.tar"):
        join_chunks(tmp_path, "kit.tar", out, digest, 4)
    chunks[2].write_bytes(b"x" * 3_000)
    with pytest.raises(SystemExit, match=r"sha256 .* is not the kit's"):
        join_chunks(tmp_path, "kit.tar", out, digest, 4)


def test_the_device_calls_carry_one_chunk_each_within_the_tool_s_limits() -> None:
    kit = REPO / ".gpu_kit_test_names"  # names only: nothing is written
    chunks = [kit / f"kit.tar.{i:03d}" for i in range(11)]
    calls = device_calls(kit, chunks)
    assert len(calls) == 11
    carried = [c for call in calls for c in call["carry"]]
    assert carried[:11] == [f".gpu_kit_test_names/kit.tar.{i:03d}" for i in range(11)]
    assert carried[-1] == ".gpu_kit_test_names/manifest.json"
    for call in calls:
        assert len(call["command"]) <= 2000 and len(call["carry"]) <= 8
        assert 1 <= call["timeout_s"] <= 600
    assert "jobs.gpu_kit run" in calls[-1]["command"]
    assert all("jobs.gpu_kit run" not in call["command"] for call in calls[:-1])
