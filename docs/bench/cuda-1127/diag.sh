#!/bin/bash
# On the device: where convoy's CUDA forward pass makes an illegal memory access.
S=/tmp/stage; SITE=/tmp/site; B=/tmp/bin; R=$OUT
export CONVOY_MODEL=/tmp/model.gguf RUST_BACKTRACE=0
[ -d $SITE/mlx/include/cccl ] || tar -C $SITE -xJf $S/include.tar.xz
[ -f /tmp/model.gguf ] || cat $S/gguf.xz.* | xz -dc -T0 > /tmp/model.gguf
start=$(date +%s)
el() { echo "+$(( $(date +%s) - start ))s"; }
p() { # name, timeout, args...
  local n=$1 t=$2; shift 2
  timeout $t $B/convoy-bench --model /tmp/model.gguf "$@" > $R/$n.txt 2>&1; local rc=$?
  echo "$n rc=$rc $(el) :: $(grep -m3 -E 'illegal|error|ms|step' $R/$n.txt | tr '\n' ' ' | cut -c1-300)"
}
p decode-default 40 --profile-decode 1 --prompt-len 16 --steps 2
p decode-noattn 40 --profile-decode 1 --prompt-len 16 --steps 2 --ablate attn
p decode-nofuse 40 --profile-decode 1 --prompt-len 16 --steps 2 --ablate fuse
p decode-b4-noattn 40 --profile-decode 4 --prompt-len 16 --steps 2 --ablate attn
p prefill-default 40 --profile-prefill 16 --prompt-len 16 --steps 2
timeout 120 compute-sanitizer --tool memcheck --show-backtrace host --print-limit 3 $B/convoy-bench --model /tmp/model.gguf --profile-decode 1 --prompt-len 16 --steps 1 > $R/sanitizer.txt 2>&1
echo "sanitizer rc=$? $(el)"; grep -m12 -E "Invalid|at .*in |Address|kernel|=========     Host Frame" $R/sanitizer.txt | cut -c1-250
echo "done $(el)"
