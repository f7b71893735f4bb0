#!/usr/bin/env bash
# Create the virtual environment in which tests/oracle/lavis_oracle.py runs the ORIGINAL
# Salesforce LAVIS 1.0.2 BLIP-2 code (CPU only; ~1 minute, ~1.3 GB).
#
#   bash tests/oracle/install.sh [VENV_DIR]        # default: .venv-lavis (git-ignored)
#
# LAVIS 1.0.2 declares 28 requirements (decord, opencv, spacy, webdataset, ...) that the
# BLIP-2 model code never imports, so it is installed with --no-deps and only what its
# BLIP-2 modules need is added, at the versions LAVIS 1.0.2 was written for.
# TORCH_SPEC overrides the torch requirement; where no CPU wheel of torch 2.13.0 is on a
# local find-links path, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash tests/oracle/install.sh
set -euo pipefail
V=${1:-.venv-lavis}
PY=${PYTHON:-python3}
"$PY" -m venv "$V"
P="$V/bin/pip"
$P install -q ${TORCH_SPEC:-torch==2.13.0}
$P install -q --no-deps salesforce-lavis==1.0.2
# LAVIS 1.0.2 needs transformers >=4.25,<4.27 (its Qformer.py / modeling_opt.py are copies of 4.26 code)
$P install -q transformers==4.26.1 safetensors
# LAVIS's pin; a plain install would pull another torch
$P install -q --no-deps timm==0.4.12
# Python parts only: PyPI's torchvision binary ops need a CUDA torch; lavis_oracle.py declares
# the two op schemas torchvision's import registers fake kernels for (nothing calls them)
$P install -q --no-deps torchvision==0.28.0
# sdist that builds against the installed torch; LAVIS imports only its checkpoint_wrapper
$P install -q --no-deps --no-build-isolation fairscale==0.4.4
# imported at module level by lavis.common.utils / lavis.models.base_model / torchvision
$P install -q omegaconf iopath pandas pillow
"$V/bin/python" - <<'PY'
import importlib.metadata as md
print(" ".join(f"{p}=={md.version(p)}" for p in ("torch", "salesforce-lavis", "transformers", "tokenizers", "timm", "safetensors")))
PY
