"""An artifact runs on an edge box without PyTorch: prove it with torch and transformers unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_captioning_runs_with_torch_and_transformers_blocked(small_artifact, tmp_path):
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        class Block(importlib.abc.MetaPathFinder):
            # Any import of these raises, as on a machine where they are not installed.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"torch", "transformers", "diffusers"}}:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import numpy as np
        from modelkiln import runtime
        pipe = runtime.load({str(small_artifact)!r})
        image = (np.arange(40 * 30 * 3) % 255).astype(np.uint8).reshape(40, 30, 3)
        out = pipe([image, image], max_new_tokens=5, num_beams=2)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "transformers"}})
        print(json.dumps({{"captions": out, "loaded": loaded}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert len(report["captions"]) == 2
