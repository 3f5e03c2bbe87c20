"""The GPU benchmark on a machine without network or TorchRec (the lent H100 / H200).

Such a machine has torch (2.11) but neither TorchRec, fbgemm-gpu, pydantic nor deltalake, no
network to fetch them, and takes at most 64 MiB of files per command. The kit carries them:

``python -m jobs.gpu_kit prepare`` (here, with PyPI): downloads the wheels for the machine's
Python and torch, adds the KuaiRand examples and fitted preprocessing of a built lake, packs
them into one tar, cuts it into chunks that one command can carry each, and writes the
commands to run there (``.gpu_kit/calls.json``, also printed): one per chunk, which copies it
to a scratch folder that outlives the command, and a last one that runs
``python -m jobs.gpu_kit run``: it joins the chunks, checks the tar's sha256, installs the
wheels with ``pip --target``, and runs the train benchmark (STAN at the paper's settings at
batch 8192 in fp32, TF32 and bf16 with the fp32 parity check, at 2048 and 32768 in TF32; PLE
and MLP_single in TF32 at 8192, the issue's references; STAN with the batches prefetched by a
thread, and with 4 loader worker processes) and a row-wise sharded STAN run, logs and results under
``$OUT`` (a run cut short still returns the rows its log printed).

Only the standard library here: ``run`` starts before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu_kit"
SCRATCH = Path("/tmp/gpu_kit")
# One command carries the working tree (about 1 MB) and its paths, 64 MiB in all.
CHUNK_BYTES = 60 * 2**20
# The GPU image's Python, and the wheels that fit its torch (2.11): fbgemm-gpu 1.6.0 is built
# against torch 2.11 and torchrec 1.6.1 asks for it; the rest are pure Python or abi3, at the
# versions this project is tested with here. torchmetrics is the one torchrec pins.
PYTHON = "3.12"
WHEELS = [
    "fbgemm-gpu==1.6.0",
    "torchrec==1.6.1",
    "tensordict==0.15.3",
    "pyvers==0.2.3",
    "iopath==0.1.9",
    "torchmetrics==1.0.3",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "deltalake==1.6.6",
    "arro3-core==0.9.1",
    "deprecated==1.3.1",
    # the image's pyarrow may be older than the loader's (>= 25)
    "pyarrow==25.0.1",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]  # fmt: skip
SPEC_NAME = "kuairand"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**22):
            h.update(block)
    return h.hexdigest()


def split_file(path: Path, chunk_bytes: int) -> list[Path]:
    """``path`` cut into ``path.000``, ``path.001``, ... of at most ``chunk_bytes`` each."""
    chunks = []
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            chunk = path.with_name(f"{path.name}.{len(chunks):03d}")
            chunk.write_bytes(block)
            chunks.append(chunk)
    return chunks


def join_chunks(folder: Path, name: str, out: Path, expected_sha256: str, n_chunks: int) -> None:
    """The chunks ``name.000`` ... of ``folder`` joined into ``out``; an error naming what is
    missing or different."""
    chunks = sorted(folder.glob(f"{name}.[0-9][0-9][0-9]"))
    if len(chunks) != n_chunks:
        have = [c.name for c in chunks]
        raise SystemExit(f"{folder}: {len(chunks)} of {n_chunks} chunks of {name} ({have})")
    with out.open("wb") as f:
        for chunk in chunks:
            with chunk.open("rb") as c:
                shutil.copyfileobj(c, f, 2**22)
    got = sha256(out)
    if got != expected_sha256:
        raise SystemExit(f"{out}: sha256 {got} is not the kit's {expected_sha256}")


# ----------------------------------------------------------------------------- here
def download_wheels(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
           "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *WHEELS], check=True)
    wheels = sorted(dest.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    missing = [w for w in WHEELS if w.split("==")[0].replace("_", "-") not in names]
    if missing:
        raise SystemExit(f"pip download left out {missing}")
    return wheels


def prepare(lake: Path, kit: Path, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """The kit under ``kit``: ``kit.tar.NNN`` chunks, ``manifest.json`` and ``calls.json``."""
    tables = lake.resolve() / SPEC_NAME
    for sub in ("examples/_delta_log", "artifacts/preprocessing.json"):
        if not (tables / sub).exists():
            raise SystemExit(
                f"{tables / sub} is missing: build the KuaiRand lake first "
                "(python -m jobs.build_features --full)"
            )
    if kit.exists():
        shutil.rmtree(kit)
    wheels = download_wheels(kit / "wheels")
    tar_path = kit / "kit.tar"
    with tarfile.open(tar_path, "w") as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        for sub in ("examples", "artifacts"):
            tar.add(tables / sub, arcname=f"lake/{SPEC_NAME}/{sub}")
    manifest = {
        "tar": tar_path.name,
        "bytes": tar_path.stat().st_size,
        "sha256": sha256(tar_path),
        "wheels": [w.name for w in wheels],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    chunks = split_file(tar_path, chunk_bytes)
    manifest["chunks"] = len(chunks)
    tar_path.unlink()
    shutil.rmtree(kit / "wheels")
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=2))
    calls = device_calls(kit, chunks)
    (kit / "calls.json").write_text(json.dumps(calls, indent=2))
    return {"manifest": manifest, "calls": calls}


def device_calls(kit: Path, chunks: list[Path]) -> list[dict]:
    """The ``run`` calls, back to back (the machine goes back after 30 s idle): each copies its
    chunk to the scratch folder; the last one also runs the benchmark."""
    rel = [str(c.relative_to(REPO)) for c in chunks]
    stage = f"mkdir -p {SCRATCH} && cp {{chunk}} {SCRATCH}/ && ls -l {SCRATCH} | tail -n +2 | wc -l"
    calls = [{"carry": [c], "command": stage.format(chunk=c), "timeout_s": 120} for c in rel[:-1]]
    manifest = str((kit / "manifest.json").relative_to(REPO))
    calls.append(
        {
            "carry": [rel[-1], manifest],
            "command": f"mkdir -p {SCRATCH} && cp {rel[-1]} {SCRATCH}/ && "
            f"PYTHONUNBUFFERED=1 python3 -m jobs.gpu_kit run --manifest {manifest} --out $OUT",
            "timeout_s": 600,
        }
    )
    return calls


# ----------------------------------------------------------------------------- there
def benchmarks(lake: Path, work: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, command) of each measurement: the issue's figures first, the longest last."""
    py = sys.executable
    if quick:  # the path itself, on any machine: a few steps at the CPU config
        return [
            ("stan", [py, "-m", "jobs.benchmark", "train", "--lake", str(lake), "--work",
                      str(work / "stan"), "--models", "stan", "--configs", "cpu",
                      "--batch-sizes", "256", "--steps", "8", "--loader-seconds", "1",
                      "--device", "cpu", "--parity", "--precisions", "fp32,bf16"]),
        ]  # fmt: skip
    # every run also profiles 5 steps (not timed): operators and CUDA kernels per step, which
    # bound a small dense arch's step on a fast GPU more than its FLOPs
    bench = [py, "-m", "jobs.benchmark", "train", "--lake", str(lake), "--device", "cuda",
             "--configs", "paper", "--steps", "200", "--profile-steps", "5"]  # fmt: skip
    return [
        # the target: 8192 in each precision, each checked against fp32
        ("stan_8192", [*bench, "--work", str(work / "stan_8192"), "--models", "stan",
                       "--batch-sizes", "8192", "--precisions", "fp32,tf32,bf16", "--parity",
                       "--loader-seconds", "5"]),
        ("stan_batches", [*bench, "--work", str(work / "stan_batches"), "--models", "stan",
                          "--batch-sizes", "2048,32768", "--precisions", "tf32",
                          "--loader-seconds", "0"]),
        # the loader runs in the step's process (672k samples/s at 8192 on 2 cores here, about
        # the target's rate): the same run with the batches made by a background thread
        ("stan_prefetch", [*bench, "--work", str(work / "stan_prefetch"), "--models", "stan",
                           "--batch-sizes", "8192", "--precisions", "tf32",
                           "--prefetch-batches", "2", "--loader-seconds", "0"]),
        # and by 4 loader worker processes (each reads a share of the files), the loader alone too
        ("stan_workers", [*bench, "--work", str(work / "stan_workers"), "--models", "stan",
                          "--batch-sizes", "8192", "--precisions", "tf32",
                          "--num-workers", "4", "--loader-seconds", "5"]),
        ("references", [*bench, "--work", str(work / "references"), "--models",
                        "ple,mlp_single", "--batch-sizes", "8192", "--precisions", "tf32",
                        "--loader-seconds", "0"]),
        ("row_wise", [py, "-m", "jobs.train", "--set", f"lake={lake}", "--set",
                      f"output_dir={work / 'row_wise'}", "--set", "train.sharding=row_wise",
                      "--set", "train.device=cuda", "--set", "train.max_steps=200",
                      "--set", "train.batch_size=8192", "--set", "train.epochs=200",
                      "--set", "train.eval_splits=[valid]", "--set", "mlflow.enabled=false",
                      "--set", "train.resume=false"]),
    ]  # fmt: skip


def run(manifest_path: Path, out: Path, scratch: Path, install: bool, quick: bool) -> int:
    manifest = json.loads(manifest_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tar_path = scratch / manifest["tar"]
    join_chunks(scratch, manifest["tar"], tar_path, manifest["sha256"], manifest["chunks"])
    root = scratch / "kit"
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(root, filter="data")
    tar_path.unlink()
    print(f"kit joined, checked and unpacked in {time.time() - t0:.0f}s", flush=True)
    env = dict(os.environ)
    if install:
        site = scratch / "site"
        shutil.rmtree(site, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target",
             str(site), *sorted(str(w) for w in (root / "wheels").glob("*.whl"))],
            check=True,
        )  # fmt: skip
        # ahead of the image's own packages (its pyarrow is older than the loader's)
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
        print(f"wheels installed at {time.time() - t0:.0f}s", flush=True)
    env["PYTHONUNBUFFERED"] = "1"
    check = "import torch, torchrec, fbgemm_gpu; print('torch', torch.__version__, 'cuda', "
    check += "torch.cuda.is_available(), 'torchrec', torchrec.__version__)"
    subprocess.run([sys.executable, "-c", check], env=env, cwd=REPO, check=True)
    failed = []
    work = scratch / "work"
    for name, cmd in benchmarks(root / "lake", work, quick):
        log = out / f"{name}.log"
        t = time.time()
        with log.open("w") as f:
            rc = subprocess.run(
                cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT
            ).returncode
        print(f"{name}: exit {rc} in {time.time() - t:.0f}s (log {log.name})", flush=True)
        for result in ("train.json", "metrics.json"):
            src = work / name / result
            if src.exists():
                shutil.copy(src, out / f"{name}_{result}")
        if rc:
            failed.append(name)
            print(log.read_text()[-3000:], flush=True)
        else:  # the markdown table the benchmark prints last
            text = log.read_text()
            print(text[text.rfind("machine:") :] if "machine:" in text else text[-1500:])
    print(f"done in {time.time() - t0:.0f}s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.gpu_kit", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    pp = sub.add_parser("prepare", help="here: wheels + lake -> chunks and the device calls")
    pp.add_argument("--lake", default="lake", help="a lake with the KuaiRand tables built")
    pp.add_argument("--kit", default=str(KIT))
    pp.add_argument("--chunk-mb", type=float, default=CHUNK_BYTES / 2**20)
    rp = sub.add_parser("run", help="there: join, check, install, benchmark")
    rp.add_argument("--manifest", default=str(KIT / "manifest.json"))
    rp.add_argument("--out", default=os.environ.get("OUT", "gpu_bench"))
    rp.add_argument("--scratch", default=str(SCRATCH))
    rp.add_argument("--no-install", action="store_true", help="use the installed packages")
    rp.add_argument("--quick", action="store_true", help="a few CPU steps: checks the path")
    args = p.parse_args(argv)
    if args.what == "prepare":
        done = prepare(Path(args.lake), Path(args.kit), int(args.chunk_mb * 2**20))
        m = done["manifest"]
        print(f"kit: {m['chunks']} chunks, {m['bytes'] / 2**20:.0f} MiB, sha256 {m['sha256']}")
        print("device calls, back to back (the machine goes back after 30 s idle):")
        for call in done["calls"]:
            print(json.dumps(call))
        return 0
    return run(Path(args.manifest), Path(args.out), Path(args.scratch), not args.no_install,
               args.quick)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
