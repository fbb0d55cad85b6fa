#!/usr/bin/env bash
# Offline end-to-end demo on the embedded shapes set (generated on first use, no download):
# train a teacher (yolov5s), a baseline student and a distilled student (yolov5n) with the same seed and
# epochs, then compare the three with val.py's comparison table. Sized for ~15 minutes on 2 CPU cores,
# a very short schedule for training from scratch: Adam with data/hyps/hyp.shapes.yaml learns far faster
# than SGD here. The same settings, over more seeds and with ablations: benchmarks/distill_gain.py.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
IMG=128
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-10}
# batch 16 with a nominal batch of 16: one optimiser step per batch, so a short run still takes many steps.
# AutoAnchor off so all three models keep the same anchors. --noval: validate after the last epoch only
# (best.pt = last.pt), which keeps the demo within 15 minutes; the benchmark validates every epoch.
COMMON=(--data shapes.yaml --imgsz $IMG --batch-size 16 --nbs 16 --optimizer Adam --hyp hyp.shapes.yaml
        --workers 2 --device cpu --seed 0 --noautoanchor --noval --project runs/demo --exist-ok)

python train_distill.py --cfg yolov5s.yaml --epochs "$TEACHER_EPOCHS" "${COMMON[@]}" --name teacher
python train_distill.py --cfg yolov5n.yaml --epochs "$STUDENT_EPOCHS" "${COMMON[@]}" --name baseline
python train_distill.py --cfg yolov5n.yaml --epochs "$STUDENT_EPOCHS" "${COMMON[@]}" --name distilled \
    --teacher runs/demo/teacher/weights/best.pt
python val.py --data shapes.yaml --imgsz $IMG --batch-size 32 --workers 2 --device cpu \
    --weights runs/demo/teacher/weights/best.pt runs/demo/baseline/weights/best.pt runs/demo/distilled/weights/best.pt \
    --project runs/demo --name val --exist-ok --table runs/demo/comparison.md
echo; cat runs/demo/comparison.md
