#!/bin/sh
# Install pacsai into a virtual environment. The one install procedure of CI (`make install`),
# of the container images (deploy/Dockerfile) and of bare-metal hosts (deploy/systemd).
#
#   deploy/install.sh [VENV]             VENV defaults to .venv
#
# Environment:
#   PYTHON              the interpreter that creates the environment (python3)
#   PACSAI_TORCH        the PyTorch requirement, installed first and pinned (torch==2.13.0):
#                       a bare `torch` would let pip pick a build of its choice
#   PACSAI_TORCH_INDEX  an extra package index for PyTorch (for instance PyTorch's CPU-only
#                       wheels, for a smaller receiver/API image); empty: the default index
#   PACSAI_EXTRAS       pip extras of pacsai ("dev" for CI and development; empty for a service)
#   PACSAI_EDITABLE     1: install the checkout in place (development); 0: a regular install
set -eu

venv=${1:-.venv}
python=${PYTHON:-python3}
torch=${PACSAI_TORCH:-torch==2.13.0}
extras=${PACSAI_EXTRAS-dev}
editable=${PACSAI_EDITABLE:-1}
here=$(cd "$(dirname "$0")/.." && pwd)

"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
if [ -n "${PACSAI_TORCH_INDEX:-}" ]; then
  "$venv/bin/pip" install -q --extra-index-url "$PACSAI_TORCH_INDEX" "$torch"
else
  "$venv/bin/pip" install -q "$torch"
fi
target="$here"
if [ -n "$extras" ]; then target="$here[$extras]"; fi
if [ "$editable" = 1 ]; then
  "$venv/bin/pip" install -q -e "$target"
else
  "$venv/bin/pip" install -q "$target"
fi
"$venv/bin/pacsai" --version
