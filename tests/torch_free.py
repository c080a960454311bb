"""Run the captioning runtime and the CLI in a subprocess where torch, transformers, diffusers and onnx
cannot be imported, as on an edge box with the runtime-only install (`pip install modelkiln`).

    report = caption_without_torch(artifact, tmp_path, prompt=None, max_new_tokens=5, num_beams=2)
    report["captions"], report["loaded"]   # captions of two fixed images; heavy modules that got loaded
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

BLOCKED = ("torch", "transformers", "diffusers", "onnx")


def fixed_image() -> np.ndarray:
    return (np.arange(40 * 30 * 3) % 255).astype(np.uint8).reshape(40, 30, 3)


# Prepended to a script: any import of the blocked packages fails as it does where they are not installed.
BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {set(BLOCKED)!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    """
)


def kiln_without_torch(argv: list[str], cwd) -> subprocess.CompletedProcess:
    """``kiln ARGV`` in a subprocess with the blocked packages unimportable."""
    script = BLOCKER + f"from modelkiln.cli import main\nsys.exit(main({[str(a) for a in argv]!r}))\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)


def caption_without_torch(artifact, cwd, **options) -> dict:
    script = BLOCKER + textwrap.dedent(
        f"""
        import json
        import numpy as np
        from modelkiln import runtime
        pipe = runtime.load({str(artifact)!r})
        image = (np.arange(40 * 30 * 3) % 255).astype(np.uint8).reshape(40, 30, 3)
        out = pipe([image, image], **{options!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {set(BLOCKED)!r})
        print(json.dumps({{"captions": out, "loaded": loaded}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise AssertionError(f"torch-free captioning failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
