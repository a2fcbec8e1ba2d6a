#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (/work/.library/device/README.md):
#   run(command="bash bench/on_device.sh", carry=[".whl"], timeout_s=600)
# .whl/ (keep it out of git: echo /.whl/ >> .git/info/exclude) holds the wheels the GPU image lacks:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl hydra-core==1.3.2 omegaconf==2.3.0
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # an sdist on PyPI; pure Python
#   python3 -m pip download --no-deps -d .whl nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.4.44
#     (data.jpeg_decoder=nvimgcodec, the hardware JPEG engines; 29 MB; nvJPEG 13.0 as the image's CUDA)
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pytest-xdist==3.8.0 execnet==2.1.1
#     (the CUDA tests in TEST_WORKERS processes, 4 by default: they took over 240 s in one on an H100,
#     most of it compiling Triton kernels on the host, one at a time)
# A second look, if device time is left: every cuDNN algorithm tried for each convolution (the grouped
# ones may have faster algorithms than PyTorch's default top 10; cuDNN's choices are cached per process):
#   run(command="TESTS=0 SECTIONS=train bash bench/on_device.sh --cudnn-benchmark-limit 0", carry=[".whl"])
# The target alone (the paper net against torchvision's, eager and compiled; about 100 s of bench):
#   run(command="TESTS=0 SECTIONS=target bash bench/on_device.sh", carry=[".whl"], timeout_s=200)
# Writes under $OUT (or ./device-out):
# gpu.txt, gpu-tests.log, bench.json, bench.log, traces/.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
# Without a GPU (a dry run of this script) Triton's kernels run in its interpreter, as in the tests.
command -v nvidia-smi >/dev/null || export TRITON_INTERPRET=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
# Correctness on the GPU first: the CUDA-only tests and the fast paths against their references.
# The ImageNet pipeline's GPU decoding (nvJPEG; nvImageCodec in and out of a child process) on real files too.
PARALLEL=""
python3 -c "import xdist" 2>/dev/null && PARALLEL="-n ${TEST_WORKERS:-4}"
[ "${TESTS:-1}" = 0 ] || timeout "${TESTS_TIMEOUT_S:-240}" python3 -m pytest -q -p no:cacheprovider --durations=20 $PARALLEL tests/test_gpu.py tests/test_fast_paths.py \
  tests/test_imagenet.py::test_gpu_decode_serves_the_cpu_paths_images_odd_files_included 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
# Then every measurement (it checks again, then times; skips what would start after BUDGET s).
# End to end first (it generates 6,144 JPEGs and their resized copies, about a minute; its
# nvImageCodec rows have never run on a GPU), then the pipeline alone and the training steps (LRN
# and training steps were measured on an H100 on 2026-11-27); then tuning and diagnosis; last, what
# the kernels cost an SM as the GPU image's Triton compiles them (no GPU time; skipped if the budget
# is spent).
# A section running over 240 s prints every thread's stack into bench.log (a hang's place).
# BENCH_TIMEOUT_S: the bench is stopped there (its JSON keeps every row written so far), so that the
# call returns its files inside the device's 600 s limit even if something hangs.
timeout "${BENCH_TIMEOUT_S:-420}" python3 src/bench.py --out "$OUT/bench.json" --trace-dir "$OUT/traces" --budget-s "${BUDGET:-300}" \
  --only "${SECTIONS:-checks,e2e,data,train,lrn,traffic,profile,lrn_configs,kernels}" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
