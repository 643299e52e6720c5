# scratch (to be deleted): parallel SFT configs, 2 cores each
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pycocotools-*.whl && export PYTHONPATH=/tmp/site:.
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -m muffin.world.build --out /tmp/w --n-feedback 10 --n-test 10 2>&1 | tail -1
mkdir -p /tmp/e
run() { timeout 570 taskset -c $1 python3 script/world/_exp_sft.py /tmp/w /tmp/e $2 "$3" $4 > /tmp/e/$2.out 2>&1 & }
run 0,1 A '{"steps":900}' 300,600,900
run 2,3 B '{"steps":900,"image_size":48}' 300,600,900
run 4,5 C '{"steps":900,"lr":1e-3}' 300,600,900
run 6,7 D '{"steps":900,"image_size":32}' 300,600,900
run 8,9 E '{"steps":900,"batch_size":32}' 300,600,900
run 10,11 F '{"steps":900,"text_hidden":96,"text_layers":2}' 300,600,900
run 12,13 G '{"steps":900,"image_size":48,"lr":1e-3}' 300,600,900
wait
tail -3 /tmp/e/*.out; cat $OUT/*.log
