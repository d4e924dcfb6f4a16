# Sourced by the GPU scripts: put composer (this checkout) and the wheels the GPU machine lacks
# (hydra-core, omegaconf, pydantic: ../shared/tools/device-wheels.sh puts them in .whl/) on the path.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
