#!/usr/bin/env bash
# Reproduce the demo's shipped models (pipeline/assets/models/cifar10/) from the full CIFAR-10
# training set in ../shared/data, with the project's own `dsmooth train` jobs, in order:
#   1. classifier   standard-trained ResNet-20 (the "pretrained" model to defend)
#   2. surrogate    another ResNet-20 (other seed): the black-box denoiser's only gradient source
#   3. mse          dncnn_small, sigma 0.25, MSE objective
#   4. stab_mse     3. fine-tuned with STAB through the frozen classifier (white-box)
#   5. blackbox     3. fine-tuned with STAB through the frozen surrogate (black-box)
#   6. mse_uniform  dncnn_small, sigma 0.25, MSE objective under UNIFORM noise (l1; demo --noise uniform)
# Each model is copied beside its training config and its final figures (metrics.json).
# Rerunning skips finished trainings (dsmooth train resumes / skips by itself).
set -euo pipefail
cd "$(dirname "$0")/../.."
assets=pipeline/assets/models/cifar10
mkdir -p "$assets"

train() {  # train CONFIG ASSET_NAME
    local config=examples/demo/$1.yaml name=$2
    dsmooth train --config "$config"
    local output model
    output=$(python -c "import yaml,sys; print(yaml.safe_load(open('$config'))['output_dir'])")
    model=$(ls -t "$output"/*/model.pt | head -n 1)
    cp "$model" "$assets/$name.pt"
    cp "$(dirname "$model")/metrics.json" "$assets/$name.metrics.json"
    cp "$config" "$assets/$name.yaml"
    echo "[train_all] $name <- $model"
}

train classifier classifier
train surrogate surrogate
train denoiser_mse denoiser_mse_s0.25
train denoiser_stab_mse denoiser_stab_mse_s0.25
train denoiser_blackbox denoiser_blackbox_s0.25
train denoiser_mse_uniform denoiser_mse_uniform_s0.25
