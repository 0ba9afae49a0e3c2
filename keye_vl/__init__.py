"""keye-vl: Kwai Keye-VL-2.0-30B-A3B for transformers 5.x.

Import root of the package. The card's folders are installed under it:
``keye_vl.modeling_keye`` (config + model), ``keye_vl.processing`` (processors) and
``keye_vl.kernels`` (DSA torch reference + Triton kernels).
"""

__version__ = "0.1.0"


def _checkout_fallback() -> None:
    """Used from a source checkout that is not pip-installed (e.g. a GPU machine with no package index, the repo
    root on ``PYTHONPATH``): the card's folders sit beside this one, not inside it. When ``keye_vl.kernels`` cannot
    be found the normal way (installed: inside the wheel, or through the editable finder), a last-resort finder maps
    exactly ``keye_vl.kernels`` / ``keye_vl.modeling_keye`` / ``keye_vl.processing`` to those folders; nothing else
    of the checkout becomes importable."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = ("kernels", "modeling_keye", "processing")
    if not all(os.path.isfile(os.path.join(root, d, "__init__.py")) for d in names):
        return
    try:
        found = importlib.util.find_spec(f"{__name__}.kernels") is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return

    class _CheckoutFinder:
        def find_spec(self, fullname, path=None, target=None):
            head, _, tail = fullname.partition(".")
            if head == __name__ and tail in names:
                return importlib.machinery.PathFinder.find_spec(fullname, [root])
            return None

    sys.meta_path.append(_CheckoutFinder())


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
