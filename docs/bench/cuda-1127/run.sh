#!/bin/bash
# On the device, after setup.sh: convoy's tests and convoy vs mlx-lm on MLX's CUDA backend.
S=/tmp/stage; SITE=/tmp/site; B=/tmp/bin; R=$OUT
export PYTHONPATH=$SITE CONVOY_MODEL=/tmp/model.gguf RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
mkdir -p /work && ln -sfn "$PWD" /work/main   # the tests read fixtures under their build path
[ -d $SITE/mlx/include/cccl ] || tar -C $SITE -xJf $S/include.tar.xz   # NVRTC reads mlx/include/cccl
[ -f /tmp/model.gguf ] || cat $S/gguf.xz.* | xz -dc -T0 > /tmp/model.gguf
sha256sum /tmp/model.gguf
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$(date +%s)
left() { echo $(( ${BUDGET:-420} - ($(date +%s) - start) )); }
for t in engine model; do to=120; [ $t = model ] && to=60
  timeout $to $B/$t --test-threads 1 > $R/test-$t.txt 2>&1; echo "$t rc=$? $(grep 'test result' $R/test-$t.txt)"
  grep -E "^test .*FAILED|panicked" $R/test-$t.txt | head -5
done
echo "tests done at +$(( $(date +%s) - start ))s"
timeout 60 $B/convoy-bench --model /tmp/model.gguf --export-mlx /tmp/f32 > $R/export.txt 2>&1 || { echo export failed; tail $R/export.txt; }
W=/tmp/stage/wl; first=convoy
for wl in closed-c1 closed-c8 closed-c32 mixed; do
  if [ $first = convoy ]; then order="convoy mlx-lm"; first=mlx; else order="mlx-lm convoy"; first=convoy; fi
  for e in $order; do
    [ $(left) -gt 40 ] || { echo "out of time before $e $wl"; continue; }
    t0=$(date +%s%N)
    if [ $e = convoy ]; then
      timeout 90 $B/convoy-bench --model /tmp/f32 --run-workload $W/$wl.json --mode continuous --result $R/results.jsonl >> $R/bench-convoy.txt 2>&1
    else
      timeout 90 python3 scripts/bench_mlx_lm.py --model /tmp/f32 --workload $W/$wl.json --mode continuous --result $R/results.jsonl >> $R/bench-mlx-lm.txt 2>&1
    fi
    echo "$e $wl rc=$? $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  done
done
tail -n 4 $R/bench-convoy.txt $R/bench-mlx-lm.txt
if [ $(left) -gt 60 ]; then
  CONVOY_RELIABILITY_SEQUENCES=${SEQ:-6} timeout $(( $(left) - 20 )) $B/reliability --test-threads 1 > $R/test-reliability.txt 2>&1
  echo "reliability rc=$? $(grep 'test result' $R/test-reliability.txt)"; grep -E "panicked|seed" $R/test-reliability.txt | head -8
fi
echo "all done at +$(( $(date +%s) - start ))s"
