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


@pytest.mark.parametrize("quick", [False, True])
def test_every_kit_command_parses_and_every_run_it_makes_validates(quick: bool) -> None:
    """A wrong flag or config key in the kit would be found only on a lent GPU, after the
    transfer: every benchmark command parses with the benchmark's own parser, and every
    ``jobs.train`` run it would launch (models x configs x batches x precisions), like the kit's
    own ``jobs.train`` calls, validates as a training config."""
    import shlex

    from jobs import benchmark
    from jobs.gpu_kit import benchmarks
    from model.config import load_train_config

    commands = benchmarks(Path("lake"), Path("/tmp/kit-work"), quick)
    assert commands
    for name, cmd in commands:
        assert cmd[1] == "-m", name
        if cmd[2] == "jobs.train":
            sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
            load_train_config(REPO / "conf" / "train.yaml", sets)
            continue
        assert cmd[2] == "jobs.benchmark", shlex.join(cmd)
        args = benchmark.build_parser().parse_args(cmd[3:])
        assert args.what == "train", name
        for config in args.configs.split(","):
            for model in args.models.split(","):
                for batch in args.batch_sizes.split(","):
                    for precision in args.precisions.split(","):
                        sets = benchmark.run_sets(
                            args.lake, Path("/tmp/out"), model, config, int(batch), args.steps,
                            args.parity, args.device, precision, args.num_workers,
                            args.prefetch_batches, args.profile_steps,
                        )  # fmt: skip
                        cfg = load_train_config(REPO / "conf" / "train.yaml", sets)
                        assert cfg.model.name == model and cfg.train.batch_size == int(batch)
