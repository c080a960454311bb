"""Peers: other toolchains `kiln bench` times beside modelkiln's own variants, each in its own virtualenv.

    kiln bench --preset full --peers optimum --out bench   # sets up ~/.cache/modelkiln/peers/optimum once

A peer's packages conflict with the project's (optimum-onnx pins transformers<4.58; the project runs
transformers 5), so each peer lives in a virtualenv made on request, and only when asked with --peers.
It is created with ``--system-site-packages``: it sees the system's torch and onnxruntime, so nothing
downloads a multi-GB torch and the peer runs on the very onnxruntime the other variants run on. pip
installs only the peer's requirements into it, with the system's torch, onnxruntime and numpy pinned;
the versions it adds (transformers 4.57, ...) shadow the system's inside the venv only.

A script shipped beside this module (``optimum_peer.py``) runs in that venv as a subprocess, importing
nothing of modelkiln: it exports the source with the peer's exporter, and serves timed captioning jobs
one image at a time over stdin/stdout, so the harness interleaves the peer with the other variants.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from modelkiln import registry
from modelkiln.errors import KilnError
from modelkiln.exporters import source as sources
from modelkiln.runtime.text import TextCodec

from . import roofline
from .runners import Job, stage_times

MARKER = "kiln-peer.json"  # in a venv: what it was set up with; in an export: what made it


@dataclass(frozen=True)
class Peer:
    """A toolchain compared against modelkiln's exports."""

    name: str  # its label in the report
    requirements: tuple[str, ...]  # pip requirements installed into its virtualenv
    pinned: tuple[str, ...]  # system distributions pinned to their installed versions inside the venv
    script: str  # file beside this module that the venv's python runs
    families: tuple[str, ...]  # modelkiln families it can export and run
    smoke: str  # Python run in the venv after pip: setup fails there, not halfway through a benchmark


PEERS = {
    "optimum": Peer(
        name="optimum-onnx",
        # A fixed release: the benchmark's numbers should not change because PyPI did. optimum imports
        # diffusers whenever it is importable, and the system's (0.42) needs huggingface_hub>=1.32,
        # which transformers 4.57 cannot use: 0.39 is the newest that works with both.
        requirements=("optimum-onnx[onnxruntime]==0.1.0", "diffusers==0.39.0"),
        # torch: never download a (CUDA) torch; onnxruntime: the same runtime as every other variant;
        # numpy: the one the system's onnxruntime and torch were built against.
        pinned=("torch", "onnxruntime", "numpy"),
        script="optimum_peer.py",
        # ORTModelForVision2Seq exports VisionEncoderDecoder models; BLIP and BLIP-2 have no exporter.
        families=("vit-gpt2",),
        smoke="from optimum.exporters.onnx import main_export; from optimum.onnxruntime import ORTModelForVision2Seq",
    ),
}


def check_peers(names: tuple[str, ...]) -> None:
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise KilnError(f"--peers {', '.join(unknown)}: unknown peer. Valid peers: {', '.join(PEERS)}.")


def default_root() -> Path:
    """``$XDG_CACHE_HOME/modelkiln/peers``, or ``~/.cache/modelkiln/peers``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "modelkiln" / "peers"


def _run(command: list[str], log_file: Path, log: Callable[[str], None]) -> None:
    """Run one setup step, its output appended to ``log_file``; fail with the output's tail."""
    log("  $ " + " ".join(command))
    with log_file.open("a") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log_file.read_text()[-1500:]
        raise KilnError(
            f"setting up the peer's virtualenv failed (exit {done.returncode}) at: {' '.join(command)}\n"
            f"{tail}\nThe full log is {log_file}. Fix the cause (network to PyPI, disk space), then run "
            "again: the venv is rebuilt from scratch."
        )


def venv_python(home: Path) -> Path:
    return home / "bin" / "python"


def _wanted(peer: Peer) -> dict:
    pins = [f"{name}=={metadata.version(name)}" for name in peer.pinned if _installed(name)]
    return {"requirements": list(peer.requirements), "pins": pins, "base": sys.executable}


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _main_site_packages(home: Path) -> None:
    """When kiln itself runs in a virtualenv, --system-site-packages would show the base interpreter's
    packages, not this environment's torch: a .pth file adds this environment's site-packages."""
    if sys.prefix == sys.base_prefix:
        return
    purelib = next((home / "lib").glob("python*/site-packages"))
    (purelib / "kiln-main-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def ensure_venv(key: str, root: Path, log: Callable[[str], None]) -> Path:
    """The peer's venv python under ``root/key``, created and pip-installed once, then reused."""
    peer, home = PEERS[key], root / key
    wanted, marker = _wanted(PEERS[key]), root / key / MARKER
    if venv_python(home).is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        log(f"peer {key}: reusing its virtualenv {home}")
        return venv_python(home)
    log(f"peer {key}: setting up its virtualenv in {home} (once; later runs reuse it)")
    log(f"  it sees the system's packages; pip installs {', '.join(peer.requirements)} into it only")
    root.mkdir(parents=True, exist_ok=True)
    setup_log = root / f"{key}-setup.log"  # beside the venv: --clear empties the venv itself
    log(f"  pip's output goes to {setup_log}")
    setup_log.write_text("")
    _run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", str(home)], setup_log, log)
    _main_site_packages(home)
    constraints = home / "constraints.txt"
    constraints.write_text("\n".join(wanted["pins"]) + "\n")
    install = [str(venv_python(home)), "-m", "pip", "install", "--constraint", str(constraints)]
    _run([*install, *peer.requirements], setup_log, log)
    _run([str(venv_python(home)), "-I", "-c", peer.smoke], setup_log, log)
    marker.write_text(json.dumps(wanted, indent=2) + "\n")  # written last: marks a complete setup
    return venv_python(home)


@dataclass(frozen=True)
class PeerSetup:
    """A peer ready to time: its venv, its script and its own export of the source."""

    key: str  # key in PEERS
    name: str  # label in the report
    python: Path  # the venv's interpreter
    script: Path  # the peer's script, run by that interpreter
    export_dir: Path  # the peer's export of the source model
    versions: dict  # the venv's package versions, as the peer's script reports them


def _environment() -> dict[str, str]:
    # The source is a local folder: a peer must never reach for a model hub.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _command(python: Path, script: Path, *args: str) -> list[str]:
    # -I: the venv's packages only; no PYTHONPATH, user site or script folder (which holds modelkiln).
    return [str(python), "-I", str(script), *args]


def call(command: list[str], what: str) -> dict:
    """Run one peer command and return its last stdout line as JSON; fail with its stderr's tail."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=_environment())
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise KilnError(
            f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}\n"
            "Run it by hand to see why: " + " ".join(command)
        )
    return json.loads(lines[-1])


def export_source(setup: PeerSetup, source: str, weights_sha256: str, log: Callable[[str], None]) -> dict:
    """The peer's export of ``source`` in ``setup.export_dir``, reused when made from the same weights
    by the same peer requirements."""
    made_by = {"weights_sha256": weights_sha256, "requirements": list(PEERS[setup.key].requirements)}
    marker = setup.export_dir / MARKER
    if marker.is_file() and made_by.items() <= json.loads(marker.read_text()).items():
        log(f"peer {setup.key}: reusing its export {setup.export_dir}")
        return json.loads(marker.read_text())
    partial = setup.export_dir.with_name(f".{setup.export_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"peer {setup.key}: exporting {source} with {setup.name}'s exporter into {setup.export_dir}")
    command = _command(setup.python, setup.script, "export", "--source", source, "--out", str(partial))
    made = {**made_by, **call(command, f"{setup.name}'s export")}
    (partial / MARKER).write_text(json.dumps(made, indent=2) + "\n")
    # Renamed into place only when complete, like modelkiln's own exports.
    shutil.rmtree(setup.export_dir, ignore_errors=True)
    partial.rename(setup.export_dir)
    return made


def not_run(key: str, family: str) -> dict:
    """The report's line for a peer that cannot run this source's family."""
    peer = PEERS[key]
    note = f"{peer.name} cannot run family {family}: it runs {', '.join(peer.families)} only; no row."
    return {"peer": key, "name": peer.name, "ran": False, "note": note}


def ran(setup: PeerSetup) -> dict:
    """The report's line for a peer that was timed."""
    versions = ", ".join(f"{name} {version}" for name, version in setup.versions.items())
    note = (
        f"{setup.name}: its own export ({setup.export_dir}), run by its own generate() in a separate "
        f"process, one image at a time in turn with the other variants. Its venv: {versions}."
    )
    return {"peer": setup.key, "name": setup.name, "ran": True, "versions": setup.versions, "note": note}


def _prepare(key: str, resolved, root: Path, work_dir: Path, log: Callable[[str], None]) -> PeerSetup:
    peer = PEERS[key]
    python = ensure_venv(key, root, log)
    setup = PeerSetup(
        key, peer.name, python, Path(__file__).with_name(peer.script), work_dir / f"peer-{key}", {}
    )
    made = export_source(setup, str(resolved.path), resolved.weights_sha256, log)
    return replace(setup, versions=made["versions"])


def prepare_peers(
    keys: tuple[str, ...], source: str, root: Path, work_dir: Path, log: Callable[[str], None]
) -> tuple[list[PeerSetup], list[dict]]:
    """Set up (once) and export with each peer that can run the source's family; a note for every peer."""
    resolved = sources.resolve_source(source)
    family = registry.detect_family(resolved.config, source).name
    setups, notes = [], []
    for key in keys:
        if family not in PEERS[key].families:
            notes.append(not_run(key, family))
            log(f"peer {key}: skipped: {notes[-1]['note']}")
            continue
        setups.append(_prepare(key, resolved, root, work_dir, log))
        notes.append(ran(setups[-1]))
    return setups, notes


def parse_job(payload: dict, decode: Callable[[list[int]], str]) -> Job:
    """A ``Job`` from one line of the peer's serve loop.

    The caption text is decoded from the tokens here, with the codec the eager baseline uses, so quality
    figures compare token ids and never two tokenizers' spacing rules.
    """
    calls = [(str(name), float(seconds)) for name, seconds in payload["calls"]]
    tokens = [int(token) for token in payload["tokens"]]
    stages = stage_times(float(payload["preprocess_s"]), calls)
    return Job(tokens, decode(tokens), float(payload["total_s"]), stages)


class PeerRunner:
    """A peer's serve loop in its venv: ``run(image)`` asks it for one timed job, like the other runners."""

    def __init__(self, setup: PeerSetup, source: str, images: list, threads: int, max_new_tokens: int):
        self.setup = setup
        self.codec = TextCodec.from_dir(Path(source))
        self.folder = tempfile.TemporaryDirectory(prefix="kiln-peer-")
        self.images = [str(Path(self.folder.name) / f"{i}.png") for i in range(len(images))]
        for image, path in zip(images, self.images, strict=True):
            image.save(path)  # PNG: lossless, so the peer sees the very pixels the others see
        self.index = {id(image): i for i, image in enumerate(images)}
        self.settings = [
            "--source",
            source,
            "--threads",
            str(threads),
            "--max-new-tokens",
            str(max_new_tokens),
        ]
        self.command = _command(
            setup.python,
            setup.script,
            "serve",
            "--model-dir",
            str(setup.export_dir),
            *self.settings,
            "--images",
            *self.images,
        )
        self.stderr = (Path(self.folder.name) / "stderr.log").open("w")
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=_environment(),
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = (Path(self.folder.name) / "stderr.log").read_text()[-1500:]
            raise KilnError(
                f"{self.setup.name}'s process ended (exit {self.process.returncode}): {tail}\n"
                "Run it by hand to see why: " + " ".join(self.command)
            )
        return json.loads(line)

    def run(self, image) -> Job:
        self.process.stdin.write(f"{self.index[id(image)]}\n")
        self.process.stdin.flush()
        return parse_job(self._read(), lambda tokens: self.codec.batch_decode([tokens])[0])

    def sizes(self) -> tuple[int, int]:
        """(the files the peer's runtime loads, weight bytes one decoder step reads) in bytes."""
        return int(self.ready["size_bytes"]), roofline.step_weight_bytes(Path(self.ready["decoder"]))

    def peak_rss(self) -> int:
        """Peak RSS of a fresh peer process that loads the export and captions the first image."""
        command = _command(
            self.setup.python,
            self.setup.script,
            "rss",
            "--model-dir",
            str(self.setup.export_dir),
            *self.settings,
            "--images",
            self.images[0],
        )
        return int(call(command, f"{self.setup.name}'s memory probe")["max_rss_bytes"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # end of input ends the serve loop
            self.process.wait(timeout=60)
        self.stderr.close()
        self.folder.cleanup()
