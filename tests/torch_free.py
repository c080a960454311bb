"""Run the captioning runtime in a subprocess where torch, transformers and diffusers cannot be imported,
as on an edge box without them.

    report = caption_without_torch(artifact, tmp_path, prompt=None, max_new_tokens=5, num_beams=2)
    report["captions"], report["loaded"]   # captions of two fixed images; heavy modules that got loaded
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

BLOCKED = ("torch", "transformers", "diffusers")


def fixed_image() -> np.ndarray:
    return (np.arange(40 * 30 * 3) % 255).astype(np.uint8).reshape(40, 30, 3)


def caption_without_torch(artifact, cwd, **options) -> dict:
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        class Block(importlib.abc.MetaPathFinder):
            # Any import of these raises, as on a machine where they are not installed.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(BLOCKED)!r}:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
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
