set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/site/recipes; export PYTHONPATH=$PWD:/tmp/site
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -x tests/test_nf4_matmul.py tests/test_nf4_cuda.py tests/test_linear_groups.py 2>&1 | tail -15
