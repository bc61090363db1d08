export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 400 python3 -m scripts.tuning.probe_hopper --odd 0 --configs '' --shapes 256x8192x128x32x32,256x4096x128x32x32,256x2048x128x32x32,256x1024x128x32x32,512x4096x128x32x32 --variants k128qlat_f075,k128qlat_s2 2>&1 | grep -v Warn | tee $OUT/probe_longdoc.log
