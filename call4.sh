export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
command -v ncu; ncu --version | tail -1
P="python3 -m scripts.tuning.probe_ncu_step --shape 256x1024x128x32x32 --lengths 1,64 --hopper k128qlat_f075"
timeout 150 ncu --launch-count 14 --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size --csv $P > $OUT/list.csv 2>$OUT/list.err
NAME=$(python3 - <<'PY'
import csv, io, os
rows = [r for r in csv.reader(io.StringIO(open(os.environ["OUT"] + "/list.csv").read())) if len(r) > 5]
hdr = rows[0]; k = hdr.index("Kernel Name"); m = hdr.index("Metric Name"); v = hdr.index("Metric Value")
names = [r[k] for r in rows[1:] if r[m] == "launch__block_size" and r[v].replace(",", "") == "384"]
print(names[0] if names else "")
PY
)
echo "kernel: $NAME"; grep -v '^==PROF' $OUT/list.csv | cut -c1-200 | head -50
timeout 300 ncu -k "$NAME" --launch-skip 2 --launch-count 4 --set full --import-source yes -o $OUT/hopper_b256 $P 2>&1 | grep -v Warn | tail -5
ncu -i $OUT/hopper_b256.ncu-rep --page details > $OUT/details.txt 2>&1
ncu -i $OUT/hopper_b256.ncu-rep --page source --csv --print-source sass > $OUT/sass.csv 2>&1
ls -la $OUT; head -c 600 $OUT/sass.csv
