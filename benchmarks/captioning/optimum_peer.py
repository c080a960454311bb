"""The optimum-onnx peer of `kiln bench`: runs inside the peer's virtualenv, never in modelkiln's own.

    VENV/bin/python -I optimum_peer.py versions
    VENV/bin/python -I optimum_peer.py export --source SRC --out DIR
    VENV/bin/python -I optimum_peer.py serve --model-dir DIR --source SRC --images A.png B.png ...
    VENV/bin/python -I optimum_peer.py rss --model-dir DIR --source SRC --images A.png

It imports only the venv's packages (optimum-onnx, transformers 4.57, the system's torch and
onnxruntime), nothing of modelkiln, whose transformers 5 it cannot share. ``export`` runs optimum's
own exporter (what ``optimum-cli export onnx`` runs). ``serve`` loads ``ORTModelForVision2Seq`` with
the bench's thread count, prints one ready line, then answers each stdin line (an image index) with one
JSON line: that image captioned by ``generate`` (greedy, exactly N new tokens, batch 1), its token ids,
and the seconds of the whole job and of every onnxruntime session call, so the harness can interleave
it image by image with the other variants and split its time into the same stages. ``rss`` captions
one image in a fresh process and prints its peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from pathlib import Path

# The venv's heavy packages (optimum, transformers, torch) are imported inside the modes that use
# them: `versions` runs right after pip and must answer even when an import would fail.
TASK = "image-to-text-with-past"  # optimum's task for VisionEncoderDecoder captioners with a KV cache
DISTRIBUTIONS = ("optimum-onnx", "optimum", "transformers", "onnxruntime", "torch", "numpy")


def versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in DISTRIBUTIONS}


def export(source: str, out: str) -> dict:
    from optimum.exporters.onnx import main_export

    # Defaults throughout, like `optimum-cli export onnx --task image-to-text-with-past`.
    main_export(source, out, task=TASK, local_files_only=True)
    return {"versions": versions(), "files": sorted(p.name for p in Path(out).iterdir())}


def _timed(method, name: str, calls: list):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            calls.append((name, time.perf_counter() - start))

    return run


def _tokenizer(source: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(source)
    except (ValueError, OSError):
        # A tokenizer saved by transformers 5 names a class 4.57 lacks; its tokenizer.json still loads.
        return PreTrainedTokenizerFast(tokenizer_file=str(Path(source) / "tokenizer.json"))


class Captioner:
    """optimum's ORTModelForVision2Seq with its session calls timed."""

    def __init__(self, model_dir: str, source: str, threads: int, max_new_tokens: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForVision2Seq
        from transformers import AutoImageProcessor

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # the thread settings modelkiln's runtime uses
        options.inter_op_num_threads = 1
        self.model = ORTModelForVision2Seq.from_pretrained(
            model_dir, session_options=options, provider="CPUExecutionProvider", local_files_only=True
        )
        self.processor = AutoImageProcessor.from_pretrained(source)
        self.tokenizer = _tokenizer(source)
        self.generation = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": max_new_tokens,
            "num_beams": 1,
            "do_sample": False,
        }
        self.calls: list = []
        self.files = [Path(self.model.encoder.path), Path(self.model.decoder.path)]
        for name in ("encoder", "decoder"):
            session = getattr(self.model, name).session
            session.run = _timed(session.run, name, self.calls)
            session.run_with_iobinding = _timed(session.run_with_iobinding, name, self.calls)

    def caption(self, image) -> dict:
        import torch

        self.calls.clear()
        start = time.perf_counter()
        pixel_values = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        preprocessed = time.perf_counter()
        with torch.no_grad():
            sequences = self.model.generate(pixel_values=pixel_values, **self.generation)
        tokens = [int(t) for t in sequences[0, 1:]]  # drop the decoder start token
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        total = time.perf_counter() - start
        return {
            "tokens": tokens,
            "text": text,
            "total_s": total,
            "preprocess_s": preprocessed - start,
            "calls": list(self.calls),
        }


def _images(paths: list[str]) -> list:
    from PIL import Image

    return [Image.open(path).convert("RGB") for path in paths]


PROTOCOL = sys.stdout  # the JSON lines the harness reads; main() sends every other print to stderr


def _emit(payload: dict) -> None:
    PROTOCOL.write(json.dumps(payload) + "\n")
    PROTOCOL.flush()


def serve(args: argparse.Namespace) -> None:
    captioner = Captioner(args.model_dir, args.source, args.threads, args.max_new_tokens)
    images = _images(args.images)
    # The files the runtime loads: optimum also leaves the unmerged decoders beside them.
    size = sum(path.stat().st_size for path in captioner.files)
    encoder, decoder = (str(path) for path in captioner.files)
    _emit({"ready": True, "versions": versions(), "size_bytes": size, "encoder": encoder, "decoder": decoder})
    for line in sys.stdin:
        if not line.strip():
            break
        _emit({"image": int(line), **captioner.caption(images[int(line)])})


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def rss(args: argparse.Namespace) -> None:
    captioner = Captioner(args.model_dir, args.source, args.threads, args.max_new_tokens)
    captioner.caption(_images(args.images)[0])
    _emit({"max_rss_bytes": peak_rss()})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    modes.add_parser("versions", help="print the peer's package versions")
    exporting = modes.add_parser("export", help="export SOURCE with optimum's exporter")
    exporting.add_argument("--source", required=True, help="save_pretrained folder of the model")
    exporting.add_argument("--out", required=True, help="new folder for optimum's ONNX files")
    for name in ("serve", "rss"):
        mode = modes.add_parser(name)
        mode.add_argument("--model-dir", required=True, help="optimum's export")
        mode.add_argument("--source", required=True, help="the model's folder: processor and tokenizer")
        mode.add_argument("--images", nargs="+", required=True, help="image files, indexed from 0")
        mode.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
        mode.add_argument("--max-new-tokens", type=int, default=16, help="tokens every caption decodes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sys.stdout = sys.stderr  # a library's stray print must not break the protocol
    if args.mode == "versions":
        _emit(versions())
    elif args.mode == "export":
        _emit(export(args.source, args.out))
    else:
        {"serve": serve, "rss": rss}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
