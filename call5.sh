export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
P="python3 -m scripts.tuning.probe_ncu_step --shape 256x1024x128x32x32 --lengths 1,64 --hopper k128qlat_f075"
timeout 300 ncu -k regex:hydragen_hopper --launch-skip 2 --launch-count 4 --set full -o $OUT/hopper_b256 $P 2>&1 | grep -v Warn | tail -5
ncu -i $OUT/hopper_b256.ncu-rep --page details > $OUT/details.txt 2>&1
ncu -i $OUT/hopper_b256.ncu-rep --page source --csv --print-source sass > $OUT/sass.csv 2>&1
ls -la $OUT; grep -n 'Duration\|Registers\|Warp Cycles Per Issued\|No Eligible' $OUT/details.txt | head -20
