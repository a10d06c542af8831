#!/usr/bin/env bash
# Wheels for the lent GPU machine (the `device` tool), which has no network and an image with torch 2.11 /
# Python 3.12 / transformers 5 but no Composer, diffusers, bitsandbytes, yamale or omegaconf. Downloads here (where
# pip reaches the registries) the pure-Python wheels of what that image lacks, at the versions this project pins,
# into .whl/ (git-ignored via .git/info/exclude). bitsandbytes keeps only its CPU and CUDA 13 libraries (4 MB instead
# of 41 MB), to stay inside the 64 MiB the working tree may take there.
#   bash bench/device_wheels.sh && <device run, carry [".whl"]> bash bench/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qsx '/.whl/' .git/info/exclude || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
rm -rf .whl && mkdir .whl
fetch() {
  PIP_CONSTRAINT= python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$@"
}
# Composer and its requirements missing there (mosaicml-cli is imported by composer.loggers).
fetch mosaicml==0.32.1 coolname==2.2.0 importlib-metadata==8.9.0 torch-optimizer==0.3.0 pytorch-ranger==0.1.1 \
  mosaicml-cli==0.7.5 argcomplete==3.7.2 arrow==1.4.0 backoff==2.2.1 gql==3.5.3 graphql-core==3.2.6 \
  prompt_toolkit==3.0.36 wcwidth==0.7.0 questionary==2.0.1 ruamel.yaml==0.19.1 termcolor==3.3.0 \
  validators==0.36.0 websockets==11.0.3
# This project's own requirements missing there.
fetch diffusers==0.39.0 yamale==6.1.0 omegaconf==2.3.1 bitsandbytes==0.50.2
PIP_CONSTRAINT= python -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only
bnb=$(ls .whl/bitsandbytes-*.whl)
zip -q -d "$bnb" $(unzip -Z1 "$bnb" | grep -E 'libbitsandbytes_.*\.so$' | grep -vE '_(cpu|cuda130)\.so$')
du -sh .whl
