"""keye-vl: Kwai Keye-VL-2.0-30B-A3B for transformers 5.x.

Import root of the package. The card's folders are installed under it:
``keye_vl.modeling_keye`` (config + model), ``keye_vl.processing`` (processors) and
``keye_vl.kernels`` (DSA torch reference + Triton kernels).
"""

__version__ = "0.1.0"


def _checkout_fallback() -> None:
    """Used from a source checkout that is not pip-installed (e.g. a GPU machine with no package index, the repo
    root on ``PYTHONPATH``): the card's folders sit beside this one, not inside it, so ``keye_vl.kernels`` etc. are
    looked up there too. Installed (wheel or editable), the folders are found the normal way and nothing changes."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isdir(os.path.join(here, "kernels")) and all(
        os.path.isfile(os.path.join(root, d, "__init__.py")) for d in ("kernels", "modeling_keye", "processing")
    ) and os.path.isfile(os.path.join(root, "setup.cfg")):
        __path__.append(root)  # noqa: F821  (the package's own __path__)


_checkout_fallback()

_LAZY = {
    "KeyeVL2Config": "keye_vl.modeling_keye",
    "KeyeVL2VisionConfig": "keye_vl.modeling_keye",
    "KeyeVL2MoeForConditionalGeneration": "keye_vl.modeling_keye",
    "KeyeVL2MoeModel": "keye_vl.modeling_keye",
    "KeyeVL2PreTrainedModel": "keye_vl.modeling_keye",
    "KeyeVL2Processor": "keye_vl.processing",
    "KeyeVL2ImageProcessor": "keye_vl.processing",
    "KeyeVL2VideoProcessor": "keye_vl.processing",
    "process_vision_info": "keye_vl.processing",
    "push_to_hub": "keye_vl.hub",
    "save_hub_folder": "keye_vl.hub",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    # Lazy: `import keye_vl` stays cheap and never imports torch/transformers by itself.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keye_vl' has no attribute {name!r}")
