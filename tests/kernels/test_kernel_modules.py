"""Each kernel file is one module object across the two import routes (``keye_vl.kernels.X`` and the model
folder's ``keye_vl.modeling_keye.X``), so a tuning or counter set through one is what the model uses."""
import importlib
import subprocess
import sys
import textwrap

import pytest

NAMES = ["keye_dsa_reference", "keye_dsa_triton_common", "keye_dsa_triton_topk", "keye_dsa_triton_kl",
         "keye_dsa_triton", "keye_dsa_decode"]


@pytest.mark.parametrize("name", NAMES)
def test_one_module_object_per_kernel_file(name):
    pytest.importorskip("triton")
    a = importlib.import_module(f"keye_vl.kernels.{name}")
    b = importlib.import_module(f"keye_vl.modeling_keye.{name}")
    assert a is b


def test_model_sees_a_tuning_set_through_keye_vl_kernels():
    """In a fresh process (import order matters): modeling first, then kernels, and the other way round."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import importlib, sys
        first, second = sys.argv[1:3]
        importlib.import_module(first)
        importlib.import_module(second)
        from keye_vl.kernels import keye_dsa_triton_topk as topk
        from keye_vl.modeling_keye import modeling_keye_vl_2 as m
        topk.CONFIG["score_bk"] = 4096
        assert m.dsa_triton.TOPK_CONFIG["score_bk"] == 4096 and m.dsa_triton.CONFIG is topk.CONFIG  # one dict
        assert m.dsa_reference is importlib.import_module("keye_vl.kernels.keye_dsa_reference")
        assert len({id(v) for k, v in sys.modules.items() if k.endswith(".keye_dsa_triton_topk")}) == 1
    """)
    for order in (["keye_vl.modeling_keye", "keye_vl.kernels.keye_dsa_triton"],
                  ["keye_vl.kernels.keye_dsa_triton", "keye_vl.modeling_keye"]):
        r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
