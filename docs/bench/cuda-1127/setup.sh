#!/bin/bash
# On the device: put MLX's CUDA build, mlx-lm and convoy's CUDA binaries together, laid out
# as mlx-sys/build.rs lays out its cache (the wheel's libmlx.so finds the CUDA libraries
# through its RPATH $ORIGIN/../../nvidia/*/lib: here the image's own CUDA 13 wheels).
S=/tmp/stage; SITE=/tmp/site; B=/tmp/bin
[ -f $SITE/.ready ] && exit 0
set -ex
mkdir -p $SITE $B /root/.cache/convoy
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE $S/mlx-0.32.2-*.whl $S/mlx_lm-*.whl
mkdir -p $SITE/mlx/lib
cat $S/libmlx.so.xz.* | xz -dc -T0 > $SITE/mlx/lib/libmlx.so
tar -C $SITE -xJf $S/extra.tar.xz
NV=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')
ln -sfn $NV $SITE/nvidia
ls $SITE/nvidia
ln -sfn $SITE /root/.cache/convoy/mlx-cuda-13-0.32.2
tar -C $B -xJf $S/bins.tar.xz
ls -la $B
ldd $B/convoy-bench | grep -E "mlx|cud|nccl|not found" || true
PYTHONPATH=$SITE python3 -c 'import mlx.core as mx; print(mx.__version__, mx.default_device(), mx.cuda.is_available() if hasattr(mx,"cuda") else "?"); a=mx.random.normal((512,512)); print((a@a).sum().item())'
touch $SITE/.ready
