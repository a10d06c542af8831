# Sourced by the GPU scripts: make senseflow_algos and its requirements importable with $PY (default python3).
# With .whl/ present (bench/device_wheels.sh, for a machine without network) install those wheels beside the image's
# torch; otherwise pip-install the package.
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/senseflow_site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/senseflow_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  "$PY" -m pip install -q -e . || exit 1
fi
export PYTHONUNBUFFERED=1
