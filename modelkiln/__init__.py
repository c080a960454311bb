"""modelkiln: turn Hugging Face vision-language and diffusion models into deployable, quantized artifacts.

Python API::

    from modelkiln import export, runtime
    export.export_model("nlpconnect/vit-gpt2-image-captioning", "out/vit-gpt2")
    pipe = runtime.load("out/vit-gpt2")
    pipe(["cat.jpg"])  # [{"generated_text": "a cat sitting on a couch"}]

The command line is ``kiln`` (see ``kiln --help``).
"""

__version__ = "0.1.0"
