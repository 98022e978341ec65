#!/usr/bin/env bash
# A CNN end to end on the command line: train, prune, recover, export, report; one run directory per stage.
# ResNet-20 on scikit-learn's bundled digits (no download). PRUNEKIT_EXAMPLE_TINY=1: one epoch on 300 images.
set -euo pipefail
OUT=${1:-runs/cnn_cli}
if [ "${PRUNEKIT_EXAMPLE_TINY:-}" = "1" ]; then EPOCHS=1; FT=1; SUBSET="--train-samples 300"; else EPOCHS=15; FT=5; SUBSET=""; fi
PK=${PRUNEKIT:-prunekit}

$PK train --model resnet20 --dataset digits --epochs $EPOCHS $SUBSET --out "$OUT/base"
$PK prune --from "$OUT/base" --criterion variance --target-macs 0.5 --out "$OUT/pruned"
$PK finetune --from "$OUT/pruned" --epochs $FT --lr 0.05 --kd --out "$OUT/finetuned"
$PK export --from "$OUT/finetuned" --format onnx --onnx-exporter torchscript --verify
$PK report "$OUT/base" "$OUT/pruned" "$OUT/finetuned" --out "$OUT/report"
