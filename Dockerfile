# The image cluster/rayservice.yaml names:  docker build -t batchserve:0.1.0 .
# Ray's own image (Python 3.11, CUDA) plus this service; tests/unit/test_cluster_files.py runs the
# install step below without Docker (pip builds the same wheel).
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /srv/batchserve
# The cpu extra: the ONNX Runtime / OpenVINO backends `backend: auto` picks from on CPU workers.
RUN python3 -m pip install --no-cache-dir "/srv/batchserve[cpu]"
ENV RAY_USAGE_STATS_ENABLED=0 RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1
WORKDIR /srv/batchserve
